"""`nf4` against bitsandbytes itself (CPU), where it installs: the same bytes (but for the
double-quantized absmax of the few blocks where bitsandbytes' approximate table search takes
an entry that is not the nearest), and decoded values bit for bit, in every dtype, with and
without dq."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from profiles.codecs import nf4
from profiles.codecs.dtypes import cast_back, dtype_name

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb_f = pytest.importorskip("bitsandbytes.functional",
                                reason="bitsandbytes is not installed (pip install bitsandbytes)")


def data(n, dtype, seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02
    x[3] = 0.5
    x[640:704] = 0.0                                     # an all-zero block
    return x.to(dtype)


def split(p: np.ndarray, n: int):
    b = nf4.num_blocks(n)
    c = -(-b // nf4.DQ_BLOCK)
    return (p[:4].view(np.float32), p[4:4 + 4 * c].view(np.float32),
            p[4 + 4 * c:4 + 4 * c + b], p[4 + 4 * c + b:])


def test_dynamic_map_and_levels_are_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), bnb_f.create_dynamic_map())
    assert torch.equal(torch.tensor(nf4.NF4), bnb_f.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64 * 1000, 64 * 300 + 17, 5, 64 * 256 * 3 + 1])
def test_bytes_and_decode_match_bitsandbytes(n, dtype):
    x = data(n, dtype, seed=n)
    q, st = bnb_f.quantize_4bit(x, quant_type="nf4", compress_statistics=True, blocksize=64)
    p = nf4.encode(x.float().numpy(), dq=True)
    offset, amax2, qa, codes = split(p, n)
    assert np.array_equal(codes, q.reshape(-1).numpy())
    assert float(offset[0]) == float(st.offset)
    assert np.array_equal(amax2, st.state2.absmax.numpy())
    ref_qa = st.absmax.numpy()
    # where every absmax of a 256-block equals the mean, absmax2 is 0 and any entry decodes to
    # the offset: bitsandbytes' search gets 0 / 0 there and its byte means nothing
    degenerate = np.repeat(amax2 == 0, nf4.DQ_BLOCK)[:qa.size]
    differ = (qa != ref_qa) & ~degenerate
    assert differ.mean() <= 0.02
    # where bitsandbytes differs it is never nearer than moesz's choice
    code = nf4.dynamic_map().numpy()
    centred = (nf4._absmax_and_codes(x.float())[0].numpy() - offset[0])
    scale = np.repeat(amax2, nf4.DQ_BLOCK)[:qa.size]
    v = centred / np.where(scale > 0, scale, 1)
    assert np.all(np.abs(v - code[qa])[differ] <= np.abs(v - code[ref_qa])[differ])
    # moesz decodes bitsandbytes' own bytes exactly as bitsandbytes does
    theirs = np.concatenate([p[:4 + 4 * amax2.size], ref_qa, codes])
    y_ref = bnb_f.dequantize_4bit(q, st).reshape(-1)
    y = cast_back(nf4.decode(torch.from_numpy(theirs), n, True), dtype_name(dtype))
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64 * 300 + 17, 6])
def test_without_double_quantization_bytes_and_decode_match(n, dtype):
    x = data(n, dtype, seed=n)
    q, st = bnb_f.quantize_4bit(x, quant_type="nf4", compress_statistics=False, blocksize=64)
    p = nf4.encode(x.float().numpy(), dq=False)
    b = nf4.num_blocks(n)
    assert np.array_equal(p[:4 * b].view(np.float32), st.absmax.numpy())
    assert np.array_equal(p[4 * b:], q.reshape(-1).numpy())
    y = cast_back(nf4.decode(torch.from_numpy(p), n, False), dtype_name(dtype))
    y_ref = bnb_f.dequantize_4bit(q, st).reshape(-1)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
