"""Compression ratios of experts: from a model profile's `ratios.parquet`, or measured here.

A model profile directory holds the ratio of each MoE layer's expert tensors per codec, mode and
level, measured on the real weights. For a weightless geometry (a preset or `arch:` spec) the
ratio is measured with the real codec on a seeded synthetic Gaussian sample (sigma 0.02, the
expert's first tensor cut to at most 2^20 values, in bf16) and cached in-process; results carry
that label. Ratios are against the original (checkpoint) dtype's bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiles.errors import MoeszError, PolicyError, ProfileError
from sim.shape import dtype_bytes

LEVELLESS_CODECS = ("raw", "lossless", "rtn8", "rtn4")  # and every codec without a bound
SYNTHETIC_SIGMA = 0.02
SYNTHETIC_MAX_VALUES = 1 << 20
_MEASURED: dict[tuple, float] = {}


def levelless(codec: str) -> bool:
    """Whether a codec has no bound level: raw, lossless, rtn and the formats users run (gq, nf4,
    mxfp4, GGUF types); their ratio is one number per layer."""
    if codec in LEVELLESS_CODECS:
        return True
    from profiles.codecs import get_codec

    try:
        return not get_codec(codec).error_bounded
    except MoeszError:
        return False


def _options_key(options: Any, codec: str | None = None) -> tuple | None:
    """Codec options as a hashable key; JSON text or a dict; None when absent or empty.

    With `codec`, the options are completed with the codec's defaults first, so a profile row
    written with `{"bits": 3}` and a spec holding `{"bits": 3, "group": 64}` meet."""
    if options is None or (isinstance(options, float) and math.isnan(options)):
        options = {}
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
    options = dict(options)
    if codec is not None and codec != "raw":
        from profiles.codecs import get_codec

        try:
            options = get_codec(codec).check_options(options)
        except MoeszError:
            pass
    return tuple(sorted(options.items())) or None


def _spec_parts(spec: Any) -> tuple[str, str | None, float | None, dict]:
    return (spec.codec, getattr(spec, "mode", None), getattr(spec, "level", None),
            dict(getattr(spec, "codec_options", None) or {}))


class RatioTable:
    """Ratios per (layer, codec, mode, level) from a profile's `ratios.parquet`.

    A level between two profiled levels is interpolated linearly in log(level) and labelled so;
    rows for several experts of one layer are averaged.
    """

    def __init__(self, df: pd.DataFrame, source: str) -> None:
        need = {"layer", "codec", "ratio"}
        if not need <= set(df.columns):
            raise ProfileError(f"{source}: needs columns {', '.join(sorted(need))} (and mode, level)")
        df = df.copy()
        for col in ("mode", "level", "codec_options"):
            if col not in df.columns:
                df[col] = None
        self.source = source
        kinds = set(df["source"].dropna().unique()) if "source" in df.columns else {"measured"}
        what = ("measured on the model's weights" if kinds <= {"measured"} else
                "measured on synthetic Gaussian weights of the model's shapes"
                if kinds == {"synthetic"} else "measured and synthetic rows")
        self.label = f"ratios from {source} ({what})"
        self.interpolated = False
        self._rows: dict[tuple, list[tuple[float, float]]] = {}
        # per-matrix rows (`matrix` gate_up, down: a matrix's ratio against its own bytes) by kind
        self._matrix_rows: dict[str, dict[tuple, list[tuple[float, float]]]] = {}
        if "matrix" not in df.columns:
            df["matrix"] = "all"
        for row in df.itertuples(index=False):
            codec = str(row.codec)
            flat = levelless(codec)
            mode = "" if flat else str(row.mode)
            key = (int(row.layer), codec, mode, _options_key(row.codec_options, codec))
            level = -1.0 if flat or pd.isna(row.level) else float(row.level)
            kind = row.matrix if isinstance(row.matrix, str) and row.matrix else "all"
            table = self._rows if kind == "all" else self._matrix_rows.setdefault(kind, {})
            table.setdefault(key, []).append((level, float(row.ratio)))
        for table in (self._rows, *self._matrix_rows.values()):
            for key, pts in table.items():  # average duplicate levels, sort by level
                merged: dict[float, list[float]] = {}
                for lv, r in pts:
                    merged.setdefault(lv, []).append(r)
                table[key] = sorted((lv, float(np.mean(rs))) for lv, rs in merged.items())

    @classmethod
    def from_parquet(cls, path: str | Path) -> "RatioTable":
        path = Path(path)
        if not path.exists():
            raise ProfileError(f"{path}: no such file; profile the model with `moesz profile model`")
        return cls(pd.read_parquet(path), str(path))

    @property
    def matrix_kinds(self) -> tuple[str, ...]:
        """The matrix kinds the table has per-matrix ratios for (none for older profiles)."""
        return tuple(sorted(self._matrix_rows))

    def matrix_ratio(self, layer: int, spec: Any, geometry: Any, kind: str) -> float | None:
        """One matrix's ratio against its own original bytes, or None where the table has no
        per-matrix row for it (the caller then uses the expert's ratio)."""
        table = self._matrix_rows.get(kind)
        codec = _spec_parts(spec)[0]
        if codec == "raw":
            return 1.0
        if not table:
            return None
        try:
            return self._lookup(table, layer, spec)
        except PolicyError:
            return None

    def ratio(self, layer: int, spec: Any, geometry: Any = None) -> float:
        if _spec_parts(spec)[0] == "raw":
            return 1.0
        return self._lookup(self._rows, layer, spec)

    def _lookup(self, rows: dict, layer: int, spec: Any) -> float:
        codec, mode, level, options = _spec_parts(spec)
        flat = levelless(codec)
        mode_key = "" if flat else str(mode)
        pts = rows.get((int(layer), codec, mode_key, _options_key(options, codec)))
        if pts is None:  # a table without codec options
            pts = rows.get((int(layer), codec, mode_key, None))
        if not pts:
            raise PolicyError(f"{self.source} has no ratio for codec {codec!r} mode {mode!r} at layer "
                              f"{layer}; profile it (moesz profile model --codecs {codec}) or change "
                              f"the policy")
        if flat:
            return pts[0][1]
        levels = [p[0] for p in pts]
        for lv, r in pts:
            if math.isclose(lv, level, rel_tol=1e-9):
                return r
        if len(pts) == 1 or not levels[0] <= level <= levels[-1]:
            raise PolicyError(f"{self.source}: level {level:g} of codec {codec!r} at layer {layer} is "
                              f"outside the profiled levels {levels[0]:g}..{levels[-1]:g}")
        self.interpolated = True
        self.label = f"ratios from {self.source}, interpolated in log(level) between profiled levels"
        x = np.log(levels)
        return float(np.interp(math.log(level), x, [p[1] for p in pts]))


class SyntheticRatios:
    """Ratios measured with the real codec on seeded Gaussian weights of the expert's shape."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.label = (f"ratio measured with the real codec on synthetic Gaussian weights "
                      f"(sigma {SYNTHETIC_SIGMA}, <= {SYNTHETIC_MAX_VALUES} values in bf16, "
                      f"seed {seed}) of the expert's shape, not on the model's weights")

    def ratio(self, layer: int, spec: Any, geometry: Any) -> float:
        codec, mode, level, options = _spec_parts(spec)
        if codec == "raw":
            return 1.0
        shapes = getattr(geometry, "expert_tensor_shapes", None) or (
            ("w", (geometry.expert_intermediate_size, geometry.hidden_size)),)
        cols = int(shapes[0][1][-1])
        flat = levelless(codec)
        key = (codec, None if flat else mode, None if flat else level,
               tuple(sorted(options.items())), cols, self.seed)
        r_bf16 = _MEASURED.get(key)
        if r_bf16 is None:
            r_bf16 = _measure(codec, mode, level, options, cols, self.seed)
            _MEASURED[key] = r_bf16
        # stored bytes per value = 2 / r_bf16; against the original dtype's bytes per value:
        return r_bf16 * dtype_bytes(geometry.dtype) / 2.0


def _measure(codec: str, mode: str | None, level: float | None, options: dict, cols: int,
             seed: int) -> float:
    import torch

    from profiles.codecs import encode

    rows = max(1, SYNTHETIC_MAX_VALUES // cols)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, min(cols, SYNTHETIC_MAX_VALUES), generator=gen) * SYNTHETIC_SIGMA)
    blob = encode(w.to(torch.bfloat16), codec=codec, mode=mode, level=level, **options)
    return float(blob.ratio)


def ratio_source_for(profile_dir: str | Path | None, seed: int = 0):
    """`RatioTable` from `DIR/ratios.parquet` when it exists, else `SyntheticRatios`."""
    if profile_dir is not None:
        path = Path(profile_dir) / "ratios.parquet"
        if path.exists():
            return RatioTable.from_parquet(path)
    return SyntheticRatios(seed)
