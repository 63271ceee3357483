"""The Triton decoder of `ans` payloads: one launch decodes every chunk, writing the original dtype.

Each program decodes G chunks as a [G, 32] tile of rANS lanes (the warp-synchronous layout of
DietGPU, Johnson 2021): at step t every lane looks its state's slot up in two tables of M = 2^14
entries — frequency and bias packed in one uint32, and the raw bits of the value the slot's symbol
decodes to — stores that value, advances its state, and the lanes whose state fell below 2^16
read the chunk's next 16-bit words at the chunk's position plus their rank among the reading
lanes (a cumulative sum across the tile's lane axis). With per-class tables (format version 2)
a value's class is read from the class map at its row (index // cols) or its matrix's column
and selects that class's M slots. The tables are built on the device from the
payload's frequencies (no copy to the host); outliers are patched afterwards with one scatter.

Values come from the table built by `ans.value_table` on the CPU, so the kernel writes exactly the
bits the numpy reference writes (tested under `TRITON_INTERPRET=1`, and on a GPU by
`benchmarks/gpu_check.py`). Reads are masked to the payload, so a corrupt payload cannot read out
of bounds; its consistency is checked by the CRC of the blob and by the CPU decoder.
"""

from __future__ import annotations

import torch

from profiles.codecs import ans, patches
from profiles.codecs.dtypes import dtype_name
from profiles.errors import CodecError

CHUNKS_PER_PROGRAM = 4
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def available() -> tuple[bool, str]:
    """(True, "") if Triton can run here: a CUDA device, or the CPU interpreter when requested."""
    from profiles.codecs import szp_triton

    return szp_triton.available()


try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is only defined where triton is installed
    triton = None


if triton is not None:
    @triton.jit(do_not_specialize=["n", "chunks", "steps", "tail_steps", "nwords", "cols",
                                   "mcells"])
    def _decode_kernel(states_ptr, offsets_ptr, words_ptr, fb_ptr, val_ptr, cmap_ptr, out_ptr,
                       n, chunks, steps, tail_steps, nwords, cols, mcells,
                       PROB_BITS: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr):
        pid = tl.program_id(0)
        c = pid * G + tl.arange(0, G)                                   # [G] chunk ids
        lane = tl.arange(0, 32)
        cvalid = c < chunks
        lid = c.to(tl.int64)[:, None] * 32 + lane[None, :]              # [G, 32] lane ids
        x = tl.load(states_ptr + lid, mask=cvalid[:, None], other=65536).to(tl.uint32,
                                                                             bitcast=True)
        pos = tl.load(offsets_ptr + c, mask=cvalid, other=0).to(tl.int64) & 0xFFFFFFFF
        nsteps = tl.where(c == chunks - 1, tail_steps, steps)
        base = c.to(tl.int64) * steps * 32
        mask_slot = (1 << PROB_BITS) - 1
        for t in range(0, steps):
            active = cvalid[:, None] & (t < nsteps)[:, None]
            slot = (x & mask_slot).to(tl.int32)
            idx = base[:, None] + t * 32 + lane[None, :]
            if AXIS != 0:          # class c's tables start at slot c * M
                if AXIS == 1:
                    cidx = idx // cols
                else:
                    cidx = (idx // mcells) * cols + idx % cols
                k = tl.load(cmap_ptr + cidx, mask=active & (idx < n), other=0).to(tl.int32)
                slot += k << PROB_BITS
            e = tl.load(fb_ptr + slot).to(tl.uint32, bitcast=True)
            v = tl.load(val_ptr + slot)
            tl.store(out_ptr + idx, v, mask=active & (idx < n))
            xn = (e & 0xFFFF) * (x >> PROB_BITS) + (e >> 16)
            need = (xn < 65536) & active
            ni = need.to(tl.int32)
            rank = tl.cumsum(ni, axis=1) - ni
            at = pos[:, None] + rank
            w = tl.load(words_ptr + at, mask=need & (at < nwords), other=0)
            w = w.to(tl.uint16, bitcast=True).to(tl.uint32)
            xn = tl.where(need, (xn << 16) | w, xn)
            x = tl.where(active, xn, x)
            pos += tl.sum(ni, axis=1)


def tables(table: torch.Tensor, meta: dict, abs_bound: float,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequency | bias << 16 as int32 [C·M], value bits [C·M]) on the table's device, no host
    copy: class c's M slots at c·M."""
    dev = table.device
    k = ans.num_symbols(int(meta["radius"]), bool(meta["nudged"]))
    c = ans.num_classes(meta)
    m = 1 << int(meta["prob_bits"])
    bits = ans.value_table(int(meta["radius"]), bool(meta["nudged"]), abs_bound, dtype_name(dtype))
    width = _INT_OF_SIZE[bits.itemsize]
    vals = torch.from_numpy(bits.view({1: "u1", 2: "i2", 4: "i4"}[bits.itemsize])).to(dev)
    all_freqs = (table[: 2 * k * c].view(torch.int16).to(torch.int64) & 0xFFFF).reshape(c, k)
    if bool((all_freqs.sum(dim=1) != m).any()):   # repeat_interleave would read past the tables
        raise CodecError(f"ans blob: symbol frequencies do not sum to {m}; the blob is corrupt")
    fbs, vs = [], []
    for freqs in all_freqs:
        sym = torch.repeat_interleave(torch.arange(k, device=dev), freqs, output_size=m)
        cum = torch.cumsum(freqs, 0) - freqs
        fbs.append((freqs[sym] | ((torch.arange(m, device=dev) - cum[sym]) << 16)).to(torch.int32))
        vs.append(vals.view(width)[sym])
    return torch.cat(fbs), torch.cat(vs)


def decode(table: torch.Tensor, cmap: torch.Tensor, states: torch.Tensor, offsets: torch.Tensor,
           words: torch.Tensor, patch: torch.Tensor, meta: dict, n: int, abs_bound: float,
           dtype: torch.dtype) -> torch.Tensor:
    """Decode an `ans` payload's sections (uint8 tensors on the device) with one kernel launch.

    Returns:
        A flat tensor of n values of `dtype` on the sections' device, outliers patched.

    Raises:
        CodecError: frequencies that do not sum to M, or a class beyond the payload's tables.
    """
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'moesz[gpu]')")
    dev = states.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty(n, dtype=_INT_OF_SIZE[itemsize], device=dev)
    if n:
        steps = int(meta["steps"])
        full, rem, tail_steps = ans.chunk_geometry(n, steps)
        chunks = full + (rem > 0)
        fb, vals = tables(table, meta, abs_bound, dtype)
        nwords = int(meta["words"])
        axis = 0 if ans.num_classes(meta) == 1 else (1 if meta["axis"] == "row" else 2)
        cols = int(meta.get("cols", 1))
        mcells = cols * int(meta.get("mrows", 1))          # values per matrix
        cm = ans.unpack_map(cmap, ans.class_map_size(meta, n)).contiguous()
        if axis and cm.numel() and int(cm.max()) >= ans.num_classes(meta):
            raise CodecError(f"ans blob: class {int(cm.max())} in the class map, "
                             f"{ans.num_classes(meta)} tables; the blob is corrupt")
        if cm.numel() == 0:
            cm = torch.zeros(1, dtype=torch.uint8, device=dev)
        grid = ((chunks + CHUNKS_PER_PROGRAM - 1) // CHUNKS_PER_PROGRAM,)
        _decode_kernel[grid](states.view(torch.int32), offsets.view(torch.int32),
                             words.view(torch.int16), fb, vals, cm, out,
                             n, chunks, steps, tail_steps if rem else steps, nwords, cols, mcells,
                             PROB_BITS=int(meta["prob_bits"]), G=CHUNKS_PER_PROGRAM, AXIS=axis)
    result = out.view(dtype)
    idx, pv = patches.unpack(patch, int(meta["patches"]), dtype, n)
    return patches.apply(result, idx, pv)


__all__ = ["available", "decode", "tables"]
