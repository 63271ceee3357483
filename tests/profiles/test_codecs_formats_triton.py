"""The Triton dequantization kernels of the quantized formats, bit for bit against their CPU
reference decoders: under `TRITON_INTERPRET=1` on small inputs (CPU), and on a GPU when there is
one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

# each case: (format module, triton module, option dicts); sizes cover partial blocks
_SCRIPT = textwrap.dedent("""
    import importlib, sys
    import numpy as np, torch
    from profiles.codecs.dtypes import cast_back, dtype_name
    CASES = {CASES}
    for fmt_name, kern_name, option_list, sizes in CASES:
        fmt = importlib.import_module("profiles.codecs." + fmt_name)
        kern = importlib.import_module("profiles.codecs." + kern_name)
        for n in sizes:
            rng = np.random.default_rng(n)
            x = (rng.standard_normal(n) * 0.02).astype(np.float32)
            if n > 100:
                x[77] = 5.0                      # one outlier block
                x[200:264] = 0.0                 # an all-zero block
            for opts in option_list:
                p = torch.from_numpy(fmt.encode(x, **opts))
                ref = fmt.decode(p, n, **opts)
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    y = kern.decode(p.to(DEVICE), n, dt, **opts).cpu()
                    want = cast_back(ref, dtype_name(dt))
                    assert y.dtype == dt, (fmt_name, n, opts, dt)
                    bits = torch.int32 if dt == torch.float32 else torch.int16
                    assert torch.equal(y.view(bits), want.view(bits)), (fmt_name, n, opts, dt)
        print("ok", fmt_name, flush=True)
    print("formats-triton-ok")
""")

CASES = [
    ("gq", "gq_triton", [{"bits": b, "group": g} for b in (2, 3, 4, 8) for g in (32, 64, 128)],
     [1, 33, 1000, 2085]),
    ("nf4", "nf4_triton", [{"dq": True}, {"dq": False}], [1, 33, 2085, 64 * 256 + 65]),
    ("mxfp4", "mxfp4_triton", [{"scale": r} for r in ("ocp", "llamacpp", "ceil")], [1, 33, 2085]),
    ("kquants", "kquants_triton",
     [{"qtype": t} for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")], [1, 300, 2085]),
]


def _run(device: str, env: dict) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(env, PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    script = f"DEVICE = {device!r}\n" + _SCRIPT.replace("{CASES}", repr(CASES))
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)


def test_kernels_match_the_cpu_decoders_under_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install 'moesz[gpu]')")
    res = _run("cpu", dict(os.environ, TRITON_INTERPRET="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "formats-triton-ok" in res.stdout


@pytest.mark.gpu
def test_kernels_match_the_cpu_decoders_on_the_gpu():
    pytest.importorskip("triton", reason="triton is not installed (pip install 'moesz[gpu]')")
    assert torch.cuda.is_available()
    res = _run("cuda", {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
