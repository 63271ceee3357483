"""Codecs that compress one expert tensor under a guaranteed error bound, with honest ratios.

    from profiles.codecs import encode, decode, Blob, get_codec, list_codecs, BOUND_MODES
    blob = encode(tensor, codec="szp", mode="meanabs", level=0.5)
    t = decode(blob, device="cpu")

Codecs: `sz3` (SZ3 via pysz, CPU), `szp` (cuSZp v3 stream, CPU and GPU), `cuszp` (libcuSZp via
ctypes, GPU), `lossless` (byte planes + zstd), `rtn8`/`rtn4` (round-to-nearest baselines) and `raw`;
`ans` (SZ3's quantizer + chunked interleaved rANS, CPU reference and a Triton decoder on CUDA).
Error-bounded codecs hold the bound strictly after rounding to the original dtype unless `strict=0`.
The quantized formats users run, not error-bounded: `gq` (group-wise, GPTQ/HQQ storage), `nf4`,
`mxfp4`, and GGUF's `q2_k` ... `q6_k`, `q8_0` (`profiles.codecs.quantized`).
See docs/codecs.md for the user manual and `benchmarks/RESULTS.md` for measured figures.
"""

from profiles.codecs.api import compressed_nbytes, decode, encode, roundtrip
from profiles.codecs.blob import Blob
from profiles.codecs.bounds import BOUND_MODES
from profiles.codecs.registry import Codec, get_codec, list_codecs

__all__ = ["encode", "decode", "roundtrip", "compressed_nbytes", "Blob", "BOUND_MODES",
           "Codec", "get_codec", "list_codecs"]
