"""Reading and writing the hardware profile JSON with errors that name the file and field.

`profile_from_dict` validates every figure (positive bandwidths, a known `source`, sorted curves
of equal length) and raises `ProfileError("FILE: field 'gpu.h2d_pinned.gbps' ...")` on the first
problem. `profile_to_dict` is its inverse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, is_dataclass
from typing import Any

from profiles.errors import ProfileError
from profiles.hardware.schema import (
    KIND, SCHEMA_VERSION, SOURCES, AttentionTimings, BatchTimings, CodecSpeed, CpuExpertFFN,
    DiskCurve, Figure, GpuProfile, HardwareProfile, HostProfile, LevelCurve, LinkFit, ModelTimings,
    ProfileSource, ThreadScaling, TokenCurve)


class _At:
    """A position in the document, for error messages."""

    def __init__(self, where: str, path: str = "") -> None:
        self.where, self.path = where, path

    def sub(self, name: str | int) -> "_At":
        p = f"{self.path}[{name}]" if isinstance(name, int) else (
            f"{self.path}.{name}" if self.path else name)
        return _At(self.where, p)

    def fail(self, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: field '{self.path}' {problem}")


def _obj(d: Any, at: _At) -> dict:
    if not isinstance(d, dict):
        raise at.fail(f"must be a JSON object, got {type(d).__name__}")
    return d


def _get(d: dict, key: str, at: _At, default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise at.sub(key).fail("is missing")
        return default
    return d[key]


def _num(v: Any, at: _At, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise at.fail(f"must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise at.fail(f"must be > 0, got {v!r}")
    if nonneg and v < 0:
        raise at.fail(f"must be >= 0, got {v!r}")
    return float(v)


def _str(v: Any, at: _At) -> str:
    if not isinstance(v, str):
        raise at.fail(f"must be a string, got {v!r}")
    return v


def _source(d: dict, at: _At) -> str:
    s = _get(d, "source", at)
    if s not in SOURCES:
        raise at.sub("source").fail(f"is {s!r}; expected one of {', '.join(SOURCES)}")
    return s


def _figure(d: Any, at: _At, *, positive: bool = True) -> Figure:
    d = _obj(d, at)
    return Figure(_num(_get(d, "value", at), at.sub("value"), positive=positive),
                  _source(d, at), str(d.get("note", "")))


def _link(d: Any, at: _At) -> LinkFit:
    d = _obj(d, at)
    err = d.get("fit_rel_error")
    return LinkFit(
        latency_s=_num(_get(d, "latency_s", at), at.sub("latency_s"), nonneg=True),
        gbps=_num(_get(d, "gbps", at), at.sub("gbps"), positive=True),
        source=_source(d, at), note=str(d.get("note", "")),
        fit_rel_error=None if err is None else _num(err, at.sub("fit_rel_error"), nonneg=True))


def _series(d: dict, key: str, at: _At, *, positive: bool, nonneg: bool = False) -> tuple:
    v = _get(d, key, at)
    if not isinstance(v, list) or not v:
        raise at.sub(key).fail("must be a non-empty list of numbers")
    return tuple(_num(x, at.sub(key).sub(i), positive=positive, nonneg=nonneg)
                 for i, x in enumerate(v))


def _count(v: Any, at: _At) -> int:
    """A count (reads in flight, threads, bytes): a whole number >= 1."""
    x = _num(v, at)
    if x < 1 or x != int(x):
        raise at.fail(f"must be a whole number >= 1, got {v!r}")
    return int(x)


def _counts(d: dict, key: str, at: _At) -> tuple[int, ...]:
    return tuple(_count(x, at.sub(key).sub(i))
                 for i, x in enumerate(_series(d, key, at, positive=False)))


def _increasing(xs: tuple, at: _At) -> None:
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise at.fail("must be strictly increasing")


def _level_curve(d: Any, at: _At) -> LevelCurve:
    d = _obj(d, at)
    levels = _series(d, "levels", at, positive=True)
    gbps = _series(d, "gbps", at, positive=True)
    _increasing(levels, at.sub("levels"))
    if len(levels) != len(gbps):
        raise at.sub("gbps").fail(f"has {len(gbps)} values for {len(levels)} levels")
    return LevelCurve(levels, gbps, _source(d, at), d.get("mode"), str(d.get("note", "")))


def _token_curve(d: Any, at: _At) -> TokenCurve:
    d = _obj(d, at)
    tokens = tuple(int(t) for t in _series(d, "tokens", at, positive=True))
    secs = _series(d, "seconds", at, positive=False, nonneg=True)
    _increasing(tokens, at.sub("tokens"))
    if len(tokens) != len(secs):
        raise at.sub("seconds").fail(f"has {len(secs)} values for {len(tokens)} token counts")
    return TokenCurve(tokens, secs, _source(d, at), str(d.get("note", "")))


def _host(d: Any, at: _At) -> HostProfile:
    d = _obj(d, at)
    codecs = {}
    for name, c in _obj(d.get("codecs", {}), at.sub("codecs")).items():
        ca = at.sub("codecs").sub(name)
        c = _obj(c, ca)
        enc, thr = c.get("encode"), c.get("threads")
        codecs[name] = CodecSpeed(_level_curve(_get(c, "decode", ca), ca.sub("decode")),
                                  None if enc is None else _level_curve(enc, ca.sub("encode")),
                                  None if thr is None else _threads(thr, ca.sub("threads")))
    ffn = d.get("cpu_expert_ffn")
    if ffn is not None:
        fa = at.sub("cpu_expert_ffn")
        ffn = _obj(ffn, fa)
        ffn = CpuExpertFFN(int(_num(_get(ffn, "hidden_size", fa), fa.sub("hidden_size"), positive=True)),
                           int(_num(_get(ffn, "intermediate_size", fa), fa.sub("intermediate_size"),
                                    positive=True)),
                           _token_curve(_get(ffn, "curve", fa), fa.sub("curve")),
                           str(ffn.get("dtype", "bf16")))
    return HostProfile(
        cpu=_str(_get(d, "cpu", at), at.sub("cpu")),
        cores=_figure(_get(d, "cores", at), at.sub("cores")),
        memory_bytes=_figure(_get(d, "memory_bytes", at), at.sub("memory_bytes")),
        memcpy_gbps=_figure(_get(d, "memcpy_gbps", at), at.sub("memcpy_gbps")),
        disk_read=_link(_get(d, "disk_read", at), at.sub("disk_read")),
        codecs=codecs, cpu_expert_ffn=ffn,
        record_check_gbps=None if d.get("record_check_gbps") is None else _figure(
            d["record_check_gbps"], at.sub("record_check_gbps")),
        disk_curve=None if d.get("disk_curve") is None else _disk_curve(d["disk_curve"],
                                                                         at.sub("disk_curve")))


def _threads(d: Any, at: _At) -> ThreadScaling:
    d = _obj(d, at)
    threads = _counts(d, "threads", at)
    speedup = _series(d, "speedup", at, positive=True)
    _increasing(threads, at.sub("threads"))
    if len(threads) != len(speedup):
        raise at.sub("speedup").fail(f"has {len(speedup)} values for {len(threads)} thread counts")
    return ThreadScaling(threads, speedup, _source(d, at), str(d.get("note", "")))


def _disk_curve(d: Any, at: _At) -> DiskCurve:
    d = _obj(d, at)
    sizes = _counts(d, "sizes", at)
    depths = _counts(d, "depths", at)
    _increasing(sizes, at.sub("sizes"))
    _increasing(depths, at.sub("depths"))
    gbps = _grid(d, "gbps", at, len(sizes), "request size", len(depths), "depth", positive=True)
    best = _count(_get(d, "best_depth", at), at.sub("best_depth"))
    err = d.get("fit_rel_error")
    return DiskCurve(sizes, depths, tuple(gbps), best, str(d.get("method", "")), _source(d, at),
                     str(d.get("note", "")),
                     None if err is None else _num(err, at.sub("fit_rel_error"), nonneg=True))


def _gpu(d: Any, at: _At) -> GpuProfile:
    d = _obj(d, at)
    decode = {name: _level_curve(c, at.sub("decode").sub(name))
              for name, c in _obj(d.get("decode", {}), at.sub("decode")).items()}
    return GpuProfile(
        name=_str(_get(d, "name", at), at.sub("name")),
        memory_bytes=_figure(_get(d, "memory_bytes", at), at.sub("memory_bytes")),
        h2d_pinned=_link(_get(d, "h2d_pinned", at), at.sub("h2d_pinned")),
        h2d_pageable=_link(_get(d, "h2d_pageable", at), at.sub("h2d_pageable")),
        d2h_pinned=_link(_get(d, "d2h_pinned", at), at.sub("d2h_pinned")),
        d2h_pageable=_link(_get(d, "d2h_pageable", at), at.sub("d2h_pageable")),
        h2d_under_compute_gbps=_figure(_get(d, "h2d_under_compute_gbps", at),
                                       at.sub("h2d_under_compute_gbps")),
        bf16_gemm_tflops=_figure(_get(d, "bf16_gemm_tflops", at), at.sub("bf16_gemm_tflops")),
        d2d_gbps=_figure(_get(d, "d2d_gbps", at), at.sub("d2d_gbps")),
        decode=decode, device_type=_device_type(d.get("device_type", "cuda"), at),
        threads=None if d.get("threads") is None else _count(d["threads"], at.sub("threads")))


def _device_type(v: Any, at: _At) -> str:
    if v not in ("cuda", "cpu"):
        raise at.sub("device_type").fail(f"is {v!r}; expected 'cuda' or 'cpu'")
    return v


def _attention(d: Any, at: _At) -> AttentionTimings:
    d = _obj(d, at)
    batch = tuple(int(b) for b in _series(d, "batch", at, positive=True))
    ctx = tuple(int(c) for c in _series(d, "context_tokens", at, positive=True))
    _increasing(batch, at.sub("batch"))
    _increasing(ctx, at.sub("context_tokens"))
    secs = _grid(d, "seconds", at, len(batch), "batch size", len(ctx), "context length",
                 nonneg=True)
    return AttentionTimings(batch, ctx, secs, _source(d, at), str(d.get("note", "")))


def _grid(d: dict, key: str, at: _At, n_rows: int, row_what: str, n_cols: int, col_what: str,
          *, positive: bool = False, nonneg: bool = False) -> tuple[tuple[float, ...], ...]:
    """A table of numbers `d[key][row][col]` with the given shape."""
    rows = _get(d, key, at)
    if not isinstance(rows, list) or len(rows) != n_rows:
        raise at.sub(key).fail(f"must be a list of {n_rows} rows (one per {row_what})")
    out = []
    for i, row in enumerate(rows):
        ra = at.sub(key).sub(i)
        if not isinstance(row, list) or len(row) != n_cols:
            raise ra.fail(f"must be a list of {n_cols} numbers (one per {col_what})")
        out.append(tuple(_num(x, ra.sub(j), positive=positive, nonneg=nonneg)
                         for j, x in enumerate(row)))
    return tuple(out)


def _timings(d: Any, at: _At) -> ModelTimings:
    d = _obj(d, at)
    lm = d.get("lm_head")
    return ModelTimings(
        model=_str(_get(d, "model", at), at.sub("model")),
        hidden_size=int(_num(_get(d, "hidden_size", at), at.sub("hidden_size"), positive=True)),
        expert_intermediate_size=int(_num(_get(d, "expert_intermediate_size", at),
                                          at.sub("expert_intermediate_size"), positive=True)),
        expert_ffn=_token_curve(_get(d, "expert_ffn", at), at.sub("expert_ffn")),
        attention_router=_attention(_get(d, "attention_router", at), at.sub("attention_router")),
        lm_head=None if lm is None else _token_curve(lm, at.sub("lm_head")),
        by_batch=_by_batch(d.get("by_batch", []), at.sub("by_batch")),
        host_miss_overhead_s=_optional_seconds(d, "host_miss_overhead_s", at),
        decode_miss_overhead_s=_optional_seconds(d, "decode_miss_overhead_s", at),
        disk_read_overhead_s=_optional_seconds(d, "disk_read_overhead_s", at))


def _optional_seconds(d: dict, key: str, at: _At) -> float | None:
    return None if d.get(key) is None else _num(d[key], at.sub(key), nonneg=True)


def _by_batch(rows: Any, at: _At) -> tuple[BatchTimings, ...]:
    if not isinstance(rows, list):
        raise at.fail("must be a list of objects (one per calibrated batch size)")
    out = []
    for i, row in enumerate(rows):
        ra = at.sub(i)
        row = _obj(row, ra)
        out.append(BatchTimings(
            batch=_count(_get(row, "batch", ra), ra.sub("batch")),
            expert_ffn=_token_curve(_get(row, "expert_ffn", ra), ra.sub("expert_ffn")),
            miss_overhead_s=_num(row.get("miss_overhead_s", 0.0), ra.sub("miss_overhead_s"),
                                 nonneg=True)))
    _increasing(tuple(b.batch for b in out), at.sub("batch"))
    return tuple(out)


def profile_from_dict(doc: dict, where: str) -> HardwareProfile:
    """Validate and build a `HardwareProfile` from its JSON document.

    Args:
        doc: the parsed JSON (kind and schema version already checked, or checked here).
        where: the file or preset name, used in error messages.

    Raises:
        ProfileError: naming `where`, the field path and what was expected.
    """
    at = _At(where)
    doc = _obj(doc, at)
    if doc.get("kind") != KIND:
        raise at.sub("kind").fail(f"is {doc.get('kind')!r}, expected {KIND!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise at.sub("schema_version").fail(
            f"is {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}; regenerate the file "
            f"with this version of moesz")
    src = _obj(_get(doc, "source", at), at.sub("source"))
    sa = at.sub("source")
    kind = _get(src, "kind", sa)
    if kind not in ("preset", "measured"):
        raise sa.sub("kind").fail(f"is {kind!r}; expected 'preset' or 'measured'")
    source = ProfileSource(kind=kind, description=str(src.get("description", "")),
                           date=_str(_get(src, "date", sa), sa.sub("date")),
                           command=src.get("command"), hostname=src.get("hostname"),
                           packages=dict(src.get("packages") or {}))
    mt = doc.get("model_timings") or []
    if isinstance(mt, dict):
        mt = [mt]
    if not isinstance(mt, list):
        raise at.sub("model_timings").fail("must be an object or a list of objects")
    gpu = doc.get("gpu")
    return HardwareProfile(
        name=_str(_get(doc, "name", at), at.sub("name")),
        host=_host(_get(doc, "host", at), at.sub("host")),
        source=source,
        gpu=None if gpu is None else _gpu(gpu, at.sub("gpu")),
        model_timings=tuple(_timings(m, at.sub("model_timings").sub(i)) for i, m in enumerate(mt)),
        raw=dict(_obj(doc.get("raw") or {}, at.sub("raw"))),
        origin=where)


def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    """The JSON document of a profile (inverse of `profile_from_dict`)."""

    def clean(v: Any) -> Any:
        if is_dataclass(v):
            v = asdict(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None and k != "origin"}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    body = clean(profile)
    doc = {"kind": KIND, "schema_version": SCHEMA_VERSION}
    for key in ("name", "source", "host", "gpu", "model_timings", "raw"):
        if key in body:
            doc[key] = body[key]
    return doc
