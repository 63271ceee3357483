"""`cuszp`: a ctypes binding to a user-built libcuSZp v3 (szcompressor/cuSZp), on CUDA tensors.

cuSZp is not on PyPI; build it yourself and point `MOESZ_CUSZP_LIB` at the shared library:

    git clone https://github.com/szcompressor/cuSZp && cd cuSZp
    # add 90 (H100/H200) to CMAKE_CUDA_ARCHITECTURES in CMakeLists.txt, then
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
    export MOESZ_CUSZP_LIB=$PWD/build/libcuSZp.so

It is used through the C API `cuSZp_compress` / `cuSZp_decompress` (1-D, fp32, fixed or plain mode).
Its streams have the same layout as moesz's `szp` (the GPU check compares them byte for byte); the
blob holds only the stream, no chunk index.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import torch

from profiles.codecs.dtypes import cast_back, dtype_name
from profiles.codecs.registry import Codec, Encoded, payload_tensor
from profiles.codecs.szp import saturation_reason
from profiles.codecs.szp_reference import VARIANTS, num_blocks, rate_area_nbytes
from profiles.errors import CodecError

ENV_VAR = "MOESZ_CUSZP_LIB"
_MODES = {"fixed": 0, "plain": 1}       # cuszp_mode_t
_DIM_1D, _TYPE_FLOAT = 1, 0             # cuszp_dim_t, cuszp_type_t
BUILD_HINT = (f"build libcuSZp v3 (git clone https://github.com/szcompressor/cuSZp; add 90 to "
              f"CMAKE_CUDA_ARCHITECTURES; cmake -S . -B build && cmake --build build) and set "
              f"{ENV_VAR}=/path/to/libcuSZp.so on a machine with a CUDA GPU")


class _Uint3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


def availability() -> tuple[bool, str]:
    path = os.environ.get(ENV_VAR)
    if not path:
        return False, f"{ENV_VAR} is not set; {BUILD_HINT}"
    if not os.path.isfile(path):
        return False, f"{ENV_VAR}={path} does not exist; {BUILD_HINT}"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible; cuSZp runs only on CUDA devices"
    return True, ""


@functools.lru_cache(maxsize=4)
def load_library(path: str):
    """Load libcuSZp and declare the two entry points' C signatures."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise CodecError(f"{ENV_VAR}={path} could not be loaded ({exc}); {BUILD_HINT}") from None
    common = [ctypes.c_float, ctypes.c_int, _Uint3, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.cuSZp_compress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_size_t)] + common
    lib.cuSZp_compress.restype = None
    lib.cuSZp_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_size_t] + common
    lib.cuSZp_decompress.restype = None
    return lib


def _library():
    ok, why = availability()
    if not ok:
        raise CodecError(f"codec 'cuszp' is not available: {why}")
    return load_library(os.environ[ENV_VAR])


def compress(x32: torch.Tensor, eb: float, variant: str = "fixed") -> torch.Tensor:
    """cuSZp_compress on a contiguous fp32 CUDA tensor; returns the stream as a uint8 CUDA tensor."""
    lib = _library()
    n = x32.numel()
    cap = rate_area_nbytes(n) + num_blocks(n) * (4 + 4 * 32)
    out = torch.zeros(cap, dtype=torch.uint8, device=x32.device)
    size = ctypes.c_size_t(0)
    stream = torch.cuda.current_stream(x32.device).cuda_stream
    lib.cuSZp_compress(ctypes.c_void_p(x32.data_ptr()), ctypes.c_void_p(out.data_ptr()), n,
                       ctypes.byref(size), ctypes.c_float(eb), _DIM_1D, _Uint3(n, 1, 1),
                       _TYPE_FLOAT, _MODES[variant], ctypes.c_void_p(stream))
    torch.cuda.synchronize(x32.device)
    return out[: size.value]


def decompress(stream_t: torch.Tensor, n: int, eb: float, variant: str = "fixed") -> torch.Tensor:
    """cuSZp_decompress into a zeroed fp32 CUDA tensor (cuSZp skips all-zero blocks)."""
    lib = _library()
    out = torch.zeros(n, dtype=torch.float32, device=stream_t.device)
    stream = torch.cuda.current_stream(stream_t.device).cuda_stream
    lib.cuSZp_decompress(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream_t.data_ptr()), n,
                         stream_t.numel(), ctypes.c_float(eb), _DIM_1D, _Uint3(n, 1, 1),
                         _TYPE_FLOAT, _MODES[variant], ctypes.c_void_p(stream))
    torch.cuda.synchronize(stream_t.device)
    return out


class CuszpCodec(Codec):
    """The original cuSZp v3 library through ctypes; CUDA only, needs MOESZ_CUSZP_LIB."""

    name = "cuszp"
    error_bounded = True
    gpu_decodable = True
    cpu_only = False
    description = f"libcuSZp v3 via ctypes (needs {ENV_VAR} and a GPU); variant fixed|plain"
    option_spec = {"variant": ("fixed", VARIANTS)}

    def availability(self):
        return availability()

    def decode_where(self):
        return "GPU"

    def saturation_reason(self, max_abs, abs_bound):
        return saturation_reason(max_abs, abs_bound)

    def encode_payload(self, x, abs_bound, options):
        if x.numel() == 0:
            return Encoded(payload=np.zeros(0, np.uint8))
        dev = x.device if x.is_cuda else torch.device("cuda")
        x32 = x.to(device=dev, dtype=torch.float32).contiguous().reshape(-1)
        stream = compress(x32, abs_bound, options["variant"])
        return Encoded(payload=stream.cpu().numpy())

    def decode_payload(self, payload, meta, dtype, shape, abs_bound, options, device):
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            return torch.empty(0, dtype=dtype, device=device)
        _library()
        gpu = device if device.type == "cuda" else torch.device("cuda")
        x32 = decompress(payload_tensor(payload).to(gpu), n, abs_bound, options["variant"])
        return cast_back(x32, dtype_name(dtype)).to(device)
