"""`moesz codecs list` and `moesz codecs bench` through typer's test runner."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()
TINY = ["codecs", "bench", "--random", "gaussian", "--shape", "64x32", "--repeats", "1"]


def run(args):
    return runner.invoke(app, args)


def assert_clean_error(res, needle):
    """Exit code 1, one `error:` line naming the problem, and no exception escaping the CLI
    (an escaping exception is what prints a traceback outside the test runner)."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert needle in res.output and "error:" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_list_shows_every_codec_and_availability():
    res = run(["codecs", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["codec"]: r for r in json.loads(res.output)}
    assert list(rows)[:7] == ["sz3", "szp", "cuszp", "lossless", "rtn8", "rtn4", "raw"]
    for name in ("gq", "nf4", "mxfp4", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"):
        assert not rows[name]["error_bounded"] and rows[name]["decodes_on"] == "CPU or GPU"
    assert rows["gq"]["options"] == {"bits": [2, 3, 4, 8], "group": [32, 64, 128]}
    assert "per-row absmax" in rows["rtn8"]["description"]
    assert rows["ans"]["error_bounded"] and rows["ans"]["decodes_on"] == "CPU or GPU"
    assert rows["szp"]["error_bounded"] and rows["szp"]["decodes_on"] == "CPU or GPU"
    assert rows["szp"]["available"] and not rows["rtn4"]["error_bounded"]
    if not torch.cuda.is_available():
        assert not rows["cuszp"]["available"] and "MOESZ_CUSZP_LIB" in rows["cuszp"]["reason"] \
            or "CUDA" in rows["cuszp"]["reason"]
    table = run(["codecs", "list"])
    assert table.exit_code == 0 and "error-bounded" in table.output and "lossless" in table.output


def test_bench_table_csv_and_json(tmp_path):
    out = tmp_path / "rows.csv"
    res = run(TINY + ["--codecs", "szp,sz3,lossless,rtn4", "--mode", "meanabs",
                      "--levels", "0.1,0.5", "--csv", str(out)])
    assert res.exit_code == 0, res.output
    assert "measured" in res.output and "median of 1" in res.output
    with open(out) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["tensor", "codec", "mode", "level", "abs_bound", "ratio", "encode_gbps",
                       "decode_gbps", "max_err_over_bound", "rmse"]
    assert [r[1] for r in rows[1:]] == ["szp", "szp", "sz3", "sz3", "lossless", "rtn4"]
    for r in rows[1:3]:
        assert r[2] == "meanabs" and float(r[5]) > 1.0 and float(r[8]) <= 1.2
    res = run(TINY + ["--codecs", "szp", "--mode", "abs", "--levels", "1e-3", "--json",
                      "--option", "szp.variant=plain"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data[0]["codec"] == "szp" and data[0]["abs_bound"] == pytest.approx(1e-3)


def test_bench_reads_npy_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    arr = (np.random.default_rng(0).standard_normal((32, 16)) * 0.02).astype(np.float32)
    np.save(tmp_path / "w.npy", arr)
    save_file({"a.weight": torch.from_numpy(arr).bfloat16(), "ids": torch.arange(3)},
              str(tmp_path / "m.safetensors"))
    for spec, name in ((tmp_path / "w.npy", "w"), (f"{tmp_path / 'm.safetensors'}:a.weight", "a.weight"),
                       (tmp_path / "m.safetensors", "a.weight")):
        res = run(["codecs", "bench", "--input", str(spec), "--codecs", "szp", "--levels", "0.5",
                   "--repeats", "1", "--json"])
        assert res.exit_code == 0, res.output
        assert [r["tensor"] for r in json.loads(res.output)] == [name]


@pytest.mark.parametrize("args,needle", [
    (["--codecs", "zfp"], "valid codecs: sz3, szp"),
    (["--codecs", "szp", "--levels", "0"], "must be a finite number > 0"),
    (["--codecs", "szp", "--levels", "nan"], "must be a finite number > 0"),
    (["--codecs", "szp", "--levels", "-1e-3"], "must be a finite number > 0"),
    (["--codecs", "szp", "--levels", "x"], "not a number"),
    (["--codecs", "szp", "--mode", "psnr"], "valid: abs, rel, meanabs, std"),
    (["--random", "cauchy"], "valid: gaussian, laplace, student-t"),
    (["--shape", "12xq"], "e.g. 4096x1024"),
    (["--dtype", "int8"], "valid: bf16, fp16, fp32"),
    (["--option", "szp.variant=outlier"], "valid: fixed, plain"),
])
def test_bad_input_is_one_line_error(args, needle):
    base = ["codecs", "bench", "--shape", "8x8", "--repeats", "1"]
    assert_clean_error(run(base + args), needle)


def test_missing_input_file_is_one_line_error(tmp_path):
    assert_clean_error(run(["codecs", "bench", "--input", str(tmp_path / "none.safetensors")]),
                       "no such file")
    assert_clean_error(run(["codecs", "bench", "--input", f"{tmp_path / 'none.safetensors'}:w"]),
                       "no such file")


def test_bench_rd_table_front_and_plot(tmp_path):
    plot = tmp_path / "rd.svg"
    res = run(TINY + ["--codecs", "sz3,szp,ans,rtn8", "--levels", "0.1,1", "--rd",
                      "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert "rate-distortion" in res.output and "★" in res.output and "max err" in res.output
    assert plot.read_text().lstrip().startswith("<?xml") and "wrote the rate-distortion" in res.output
    res = run(TINY + ["--codecs", "szp,ans,lossless", "--levels", "0.1,1", "--rd", "--json"])
    rows = json.loads(res.output)
    front = {(r["codec"], r["level"]) for r in rows if r["pareto"]}
    assert ("lossless", None) in front                              # the only exact point
    for r in rows:                                                  # nothing on it is dominated
        if r["pareto"]:
            assert not any(o["ratio"] > r["ratio"] and o["rmse"] < r["rmse"] for o in rows)
    assert all(r["max_err_over_bound"] is None or r["max_err_over_bound"] <= 1.0 for r in rows)


@pytest.mark.parametrize("args,needle", [
    (["--plot", "x.png"], "--plot needs --rd"),
    (["--rd", "--plot", "x.txt"], "expected a file name ending in .png"),
])
def test_rd_plot_bad_input(args, needle, tmp_path):
    base = ["codecs", "bench", "--shape", "8x8", "--repeats", "1", "--codecs", "ans"]
    assert_clean_error(run(base + [a if a not in ("x.png", "x.txt") else str(tmp_path / a)
                                   for a in args]), needle)
