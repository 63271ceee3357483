"""Checkpoints read as files: geometry and fingerprint without loading, on-disk expert layouts,
sharded and wide checkpoints, streaming and resumable pack, and bad files refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from planner.cli import app
from profiles.errors import ModelError
from profiles.models import checkpoint_info, load_model, model_fingerprint, resolve_geometry
from profiles.models.fingerprint import sample_positions
from profiles.models.geometry import geometry_from_model
from profiles.models.loading import _meta_model, _read_config
from profiles.models.random_checkpoint import write_random_checkpoint
from profiles.models.source import FileExperts
from profiles.packed import pack, read_packed
from profiles.packed.read import PackedError
from profiles.policy import Policy, StorageSpec
from tests.fixtures_models import ARCHITECTURES, save_tiny_model, tiny_model

runner = CliRunner()
SZP = Policy(default=StorageSpec.parse("szp:meanabs:1"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_files_give_the_loaded_models_experts_geometry_and_fingerprint(arch, tmp_path):
    """Per-expert (mixtral w1/w3, qwen gate/up) and fused (gpt_oss) layouts map to the tensors
    transformers builds in memory, and files and memory agree on geometry and fingerprint."""
    path = save_tiny_model(arch, tmp_path / arch)
    loaded = load_model(str(path))
    src = FileExperts.open(str(path))
    assert src.layout.kind == ("fused" if arch == "gpt_oss" else "per-expert")
    for ref in loaded.expert_map.experts:
        got = src.expert_tensors(ref.layer, ref.expert)
        assert list(got) == list(ref.tensors)
        for name, t in ref.tensors.items():
            assert torch.equal(got[name], t), (ref.layer, ref.expert, name)
    assert src.geometry == loaded.geometry
    config = _read_config(path, False)
    meta = geometry_from_model(_meta_model(config, "bf16", False, str(path)), str(path), "bf16",
                               None, src.files.total_bytes)
    assert src.geometry == meta
    assert src.fingerprint == loaded.fingerprint == model_fingerprint(loaded.expert_map)


def test_sharded_checkpoint_reads_through_its_index(tmp_path):
    path = tmp_path / "sharded"
    tiny_model("qwen2_moe", dtype=torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 3
    single = save_tiny_model("qwen2_moe", tmp_path / "single")
    a, b = checkpoint_info(str(path)), checkpoint_info(str(single))
    assert a.fingerprint == b.fingerprint
    assert a.geometry.bytes_per_expert == b.geometry.bytes_per_expert
    assert load_model(str(path)).fingerprint == a.fingerprint


def test_fingerprint_samples_past_2_to_the_24(tmp_path):
    """fp1 indexed with float32 linspace and crashed on tensors over 2^24 values (every real
    Mixtral expert); one wide expert (gate_up 2 x 8200 x 1024 = 16.8 M values) now works, from
    the files and from memory alike."""
    n = 2 * 8200 * 1024
    assert n > 2**24 and sample_positions(n)[-1] == n - 1
    assert list(sample_positions(5)) == [0, 1, 2, 3, 4]
    path = tmp_path / "wide"
    write_random_checkpoint(path, "mixtral", layers=1, shards=2, hidden_size=1024,
                            intermediate_size=8200, num_local_experts=2, num_experts_per_tok=1,
                            num_attention_heads=8, num_key_value_heads=2, vocab_size=64)
    info = checkpoint_info(str(path))
    assert info.geometry.expert_tensor_shapes == (("gate_up_proj", (16400, 1024)),
                                                  ("down_proj", (1024, 8200)))
    loaded = load_model(str(path))
    assert model_fingerprint(loaded.expert_map) == info.fingerprint == loaded.fingerprint


def test_model_info_reads_files_without_loading(tmp_path, monkeypatch):
    path = save_tiny_model("mixtral", tmp_path / "m")
    import transformers

    def refuse(*a, **k):
        raise AssertionError("model info must not load or build the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    r = runner.invoke(app, ["model", "info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["fingerprint"].startswith("fp2:") and "nothing loaded" in doc["source"]


def test_streamed_pack_equals_the_in_memory_pack(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    a = pack(str(path), SZP, tmp_path / "streamed")
    b = pack(load_model(str(path)), SZP, tmp_path / "memory")
    for rel in sorted(a.manifest["files"]):
        if rel.startswith("experts/"):
            assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes(), rel
    assert a.manifest["experts"] == b.manifest["experts"]
    from safetensors.torch import load_file

    x, y = load_file(a.path / "non_expert.safetensors"), load_file(b.path / "non_expert.safetensors")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    from profiles.packed import load_packed

    la, lb = load_packed(a.path), load_packed(b.path)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(la.model(ids).logits, lb.model(ids).logits)


def test_interrupted_pack_resumes_from_finished_layers(tmp_path, monkeypatch):
    path = save_tiny_model("qwen3_moe", tmp_path / "q")
    out = tmp_path / "packed"

    def stop_after_first_layer(done, total, label):
        if label.endswith("done"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(str(path), SZP, out, progress=stop_after_first_layer)
    assert not (out / "manifest.json").exists()
    with pytest.raises(PackedError, match="incomplete packed checkpoint.*resume"):
        read_packed(out)
    first = out / "experts" / "layer_001.bin"
    stamp = first.stat().st_mtime_ns
    from profiles.packed import records

    encoded = []
    real = records.encode_expert
    monkeypatch.setattr("profiles.packed.write.encode_expert",
                        lambda t, s, **kw: encoded.append(1) or real(t, s, **kw))
    ckpt = pack(str(path), SZP, out)
    assert first.stat().st_mtime_ns == stamp          # reused, verified by its SHA-256
    assert len(encoded) == 4                           # only layer 2's four experts
    assert not (out / ".pack-state").exists()
    read_packed(ckpt.path, verify=True)
    fresh = pack(str(path), SZP, tmp_path / "fresh")
    assert first.read_bytes() == (fresh.path / "experts" / "layer_001.bin").read_bytes()


def test_a_damaged_finished_layer_is_packed_again(tmp_path):
    path = save_tiny_model("qwen3_moe", tmp_path / "q")
    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        pack(str(path), SZP, out, progress=lambda d, t, lab: (_ for _ in ()).throw(
            KeyboardInterrupt) if lab.endswith("done") else None)
    layer = out / "experts" / "layer_001.bin"
    good = layer.read_bytes()
    layer.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    pack(str(path), SZP, out)
    assert layer.read_bytes() == good


def test_disk_full_during_pack_is_one_line_and_resumable(tmp_path):
    """A write limit (RLIMIT_FSIZE, as a full disk) stops `moesz pack` in a child process: one
    line, non-zero exit, no manifest; the source is untouched; rerun without it completes."""
    path = save_tiny_model("qwen3_moe", tmp_path / "q", hidden_size=64)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    out = tmp_path / "packed"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); "
            "from planner.cli import main; sys.argv = ['moesz'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "pack", str(path), "--uniform", "raw",
                           "--out", str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "resume" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "manifest.json").exists()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    r = runner.invoke(app, ["pack", str(path), "--uniform", "raw", "--out", str(out)])
    assert r.exit_code == 0, r.output
    read_packed(out, verify=True)


def _shard_dir(tmp_path) -> Path:
    path = tmp_path / "sharded"
    tiny_model("mixtral", dtype=torch.bfloat16).save_pretrained(path, max_shard_size="30KB")
    return path


def _one_line_error(args: list[str], pattern: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    text = r.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and pattern in text, text


def test_missing_shard(tmp_path):
    path = _shard_dir(tmp_path)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    _one_line_error(["model", "info", str(path)], "listed in model.safetensors.index.json but "
                                                  "missing")


def test_truncated_shard(tmp_path):
    path = _shard_dir(tmp_path)
    victim = sorted(path.glob("*.safetensors"))[-1]
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 100)
    _one_line_error(["model", "info", str(path)], "truncated")
    _one_line_error(["pack", str(path), "--uniform", "raw", "--out", str(tmp_path / "o")],
                    "truncated")


def test_header_that_lies_about_offsets(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 2]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    _one_line_error(["model", "info", str(path)], "the header lies")


def test_tokenizer_of_another_format(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    (path / "tokenizer.json").write_text(json.dumps({"kind": "something else", "vocab": [1, 2]}))
    _one_line_error(["model", "eval", str(path), "--limit", "1"], "cannot be read as a Hugging "
                                                                  "Face tokenizer")


def test_pickle_only_checkpoint_is_never_unpickled(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(
        b"\x80\x04\x95" + f"cos\nsystem\n(V touch {marker}\ntR.".encode())
    for args in (["model", "info", str(path)],
                 ["pack", str(path), "--uniform", "raw", "--out", str(tmp_path / "o")],
                 ["model", "eval", str(path), "--limit", "1"]):
        _one_line_error(args, "pickle")
    assert not marker.exists()


def test_a_dense_checkpoint_is_refused_from_its_files(tmp_path):
    path = tmp_path / "dense"
    from tests.fixtures_models import tiny_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(path)
    with pytest.raises(ModelError, match="Mixture-of-Experts"):
        checkpoint_info(str(path))
    assert resolve_geometry  # the geometry path refuses it too (tested in test_loading)


def test_random_checkpoint_writer_matches_transformers_layout(tmp_path):
    path = tmp_path / "r"
    size = write_random_checkpoint(path, "qwen2_moe", layers=2, shards=3, hidden_size=64,
                                   moe_intermediate_size=32, num_experts=4,
                                   shared_expert_intermediate_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    assert len(list(path.glob("*.safetensors"))) == 3
    loaded = load_model(str(path))
    assert loaded.geometry.total_bytes == size and loaded.geometry.shared_expert_bytes > 0
    assert os.path.getsize(path / "config.json") > 0


def test_ratios_only_streams_from_the_files_without_loading(tmp_path, monkeypatch):
    path = _shard_dir(tmp_path)
    import pandas as pd
    import transformers

    def refuse(*a, **k):
        raise AssertionError("--ratios-only must not load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    out = tmp_path / "prof"
    r = runner.invoke(app, ["profile", "model", str(path), "--out", str(out), "--ratios-only",
                            "--codecs", "szp", "--levels", "1", "--ratio-sample", "2"])
    assert r.exit_code == 0, r.output
    frame = pd.read_parquet(out / "ratios.parquet")
    assert set(frame.codec) == {"szp", "lossless", "rtn8", "rtn4"}
    assert (frame.n_experts == 2).all() and (frame.ratio > 1).all()
    monkeypatch.undo()
    from profiles.profiling.ratios import measure_ratios

    ref = measure_ratios(load_model(str(path)), ["szp"], "meanabs", [1.0], sample=2)
    assert ref["ratio"].tolist() == frame["ratio"].tolist()


def test_an_fp1_fingerprint_is_refused_with_a_line_saying_to_redo_it(tmp_path):
    from profiles.errors import PolicyError

    path = save_tiny_model("mixtral", tmp_path / "m")
    old = Policy(fingerprint="fp1:3f2a9c0d1b7e4a55", default=StorageSpec.parse("szp:meanabs:1"))
    with pytest.raises(PolicyError, match="fp1 model fingerprint .* from an older moesz.*redo it"):
        pack(str(path), old, tmp_path / "o")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_decoder_layers_past_the_config_are_not_experts_of_the_model(tmp_path):
    """DeepSeek-V3 ships its multi-token-prediction layer as `model.layers.61` (experts and all)
    beside 61 decoder layers; transformers does not build it. Files and memory agree on the
    model's layers, and the layer is left out of the fingerprint, offloading and pack."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_model("deepseek_v3", tmp_path / "ds")
    plain = checkpoint_info(str(path))
    tensors = load_file(path / "model.safetensors")
    extra = {k.replace("model.layers.2.", "model.layers.3."): v.clone()
             for k, v in tensors.items() if k.startswith("model.layers.2.")}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    info = checkpoint_info(str(path))
    memory = load_model(str(path))
    assert info.geometry.moe_layers == memory.geometry.moe_layers == (1, 2)
    assert info.geometry == memory.geometry
    assert info.fingerprint == plain.fingerprint == model_fingerprint(memory.expert_map)
    disk = load_model(str(path), offload=True)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(memory.model(ids).logits, disk.model(ids).logits)
    ckpt = pack(str(path), SZP, tmp_path / "packed")
    assert sorted(r for r in ckpt.manifest["files"] if r.startswith("experts/")) == [
        "experts/layer_001.bin", "experts/layer_002.bin"]
    from profiles.packed import load_packed

    load_packed(ckpt.path)


def test_packing_over_another_models_pack_leaves_none_of_its_files(tmp_path):
    """--out may be an earlier packed checkpoint to overwrite: its layer files and tokenizer must
    not survive into (and be listed by) the new one when the new model has fewer MoE layers and
    no tokenizer of its own."""
    from profiles.packed import load_packed

    first = save_tiny_model("mixtral", tmp_path / "m")            # MoE layers 0-2
    (first / "tokenizer.json").write_text(json.dumps({"kind": "not ours"}))
    out = tmp_path / "packed"
    pack(str(first), SZP, out)
    second = save_tiny_model("qwen3_moe", tmp_path / "q")         # MoE layers 1-2, no tokenizer
    ckpt = pack(str(second), SZP, out)
    assert sorted(r for r in ckpt.manifest["files"] if r.startswith("experts/")) == [
        "experts/layer_001.bin", "experts/layer_002.bin"]
    assert not (out / "experts" / "layer_000.bin").exists()
    assert not (out / "tokenizer.json").exists() and "tokenizer.json" not in ckpt.manifest["files"]
    assert load_packed(out).tokenizer is None


def test_a_changed_policy_does_not_resume_and_leaves_no_stale_layer(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        pack(str(path), SZP, out, progress=lambda d, t, lab: (_ for _ in ()).throw(
            KeyboardInterrupt) if lab.endswith("done") else None)
    raw = Policy(default=StorageSpec.parse("raw"))
    ckpt = pack(str(path), raw, out)
    assert {e["spec"] for e in ckpt.manifest["experts"]} == {"raw"}
    fresh = pack(str(path), raw, tmp_path / "fresh")
    for rel in fresh.manifest["files"]:
        if rel.startswith("experts/"):
            assert (out / rel).read_bytes() == (fresh.path / rel).read_bytes(), rel


def test_ratios_of_another_model_in_out_are_refused_not_reused(tmp_path):
    """--ratios-only writes ratios.parquet before any profile.json exists; a later run for
    another model into the same --out must not take those ratios as its own."""
    a = save_tiny_model("mixtral", tmp_path / "a")
    b = save_tiny_model("mixtral", tmp_path / "b", seed=1)   # same geometry, other weights
    out = tmp_path / "prof"
    args = ["--out", str(out), "--ratios-only", "--codecs", "szp", "--levels", "1",
            "--ratio-sample", "1"]
    r = runner.invoke(app, ["profile", "model", str(a), *args])
    assert r.exit_code == 0, r.output
    _one_line_error(["profile", "model", str(b), *args], "ratios of another model")
    from profiles.profiling import ProfileRequest, profile_model

    with pytest.raises(Exception, match="ratios of another model"):
        profile_model(ProfileRequest(model=str(b), out=out, codecs="szp", levels="1",
                                     ratio_sample=1, limit=1, tasks="sort"))
    r = runner.invoke(app, ["profile", "model", str(a), *args])   # its own model resumes
    assert r.exit_code == 0, r.output


def test_packed_directories_given_as_checkpoints_say_what_they_are(tmp_path):
    """An interrupted pack's directory holds non_expert.safetensors but no experts: commands that
    read checkpoints said 'no routed-expert tensors … needs a Mixture-of-Experts model'."""
    path = save_tiny_model("mixtral", tmp_path / "m")
    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        pack(str(path), SZP, out, progress=lambda d, t, lab: (_ for _ in ()).throw(
            KeyboardInterrupt) if lab.endswith("done") else None)
    (out / "non_expert.safetensors").write_bytes(
        (path / "model.safetensors").read_bytes())   # as if it had got that far
    for args in (["model", "info", str(out)],
                 ["model", "eval", str(out), "--limit", "1"],
                 ["model", "eval", str(out), "--limit", "1", "--host-mem", "10%"],
                 ["pack", str(out), "--uniform", "raw", "--out", str(tmp_path / "o")],
                 ["profile", "model", str(out), "--out", str(tmp_path / "p"), "--ratios-only"]):
        _one_line_error(args, "incomplete packed checkpoint")
    done = pack(str(path), SZP, out)
    for args in (["model", "info", str(done.path)],
                 ["pack", str(done.path), "--uniform", "raw", "--out", str(tmp_path / "o")],
                 ["profile", "model", str(done.path), "--out", str(tmp_path / "p"),
                  "--ratios-only"]):
        _one_line_error(args, "is a packed checkpoint")


def test_weightless_specs_read_as_files_name_what_is_needed(tmp_path):
    for args in (["pack", "arch:mixtral", "--uniform", "raw", "--out", str(tmp_path / "o")],
                 ["profile", "model", "preset:mixtral-8x7b", "--out", str(tmp_path / "p"),
                  "--ratios-only"]):
        _one_line_error(args, "needs builtin or a local checkpoint directory")


def test_an_index_that_names_a_shard_by_a_number(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": 1}}))
    _one_line_error(["model", "info", str(path)], "not a safetensors index")


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_config_json_of_another_width_is_refused_in_one_line(tmp_path):
    """config.json disagreeing with the files' shapes: model info reported the expert FFN width
    from the wrong axis, and evaluation from disk ended in a copy_ traceback."""
    wide = save_tiny_model("mixtral", tmp_path / "wide")
    _edit_config(wide, hidden_size=64)
    for args in (["model", "info", str(wide)],
                 ["model", "eval", str(wide), "--limit", "1", "--host-mem", "1GiB"],
                 ["pack", str(wide), "--uniform", "raw", "--out", str(tmp_path / "o")]):
        _one_line_error(args, "config.json")
    for name, change in (("ffn", {"intermediate_size": 48}), ("vocab", {"vocab_size": 128})):
        path = save_tiny_model("mixtral", tmp_path / name)
        _edit_config(path, **change)
        _one_line_error(["model", "eval", str(path), "--limit", "1", "--host-mem", "1GiB"],
                        "config.json disagree")
