"""Reading a model profile directory (`docs/model-profile.md`) for the planner.

The profiler writes `profile.json`, `ratios.parquet`, `sensitivity.parquet` and `traces.parquet`.
The planner needs all four: the geometry and fingerprint, the per-layer compression ratios (bytes
of each choice), the per-target accuracy changes (the accuracy model) and routing traces (hit
rates of the cost model). Columns are checked here once, so later code can index freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from profiles.errors import ProfileError
from profiles.fileio import read_versioned_json
from profiles.profiling.format import KIND, SCHEMA_VERSION, read_table, with_matrix_column

SENSITIVITY_COLUMNS = (
    "target", "target_kind", "layers", "experts", "codec", "mode", "level", "surrogate", "task",
    "n",
    "strict_change", "strict_change_low", "strict_change_high", "content_change",
    "content_change_low", "content_change_high", "strict_mcnemar_p", "content_mcnemar_p",
    "kl_nats")
RATIO_COLUMNS = ("layer", "codec", "mode", "level", "ratio", "original_bytes_per_expert")


@dataclass(frozen=True)
class ModelProfile:
    """A model profile directory, read and checked.

    Attributes:
        path: the directory.
        doc: `profile.json` as a dict.
        geometry: the model's `ModelGeometry`.
        fingerprint: the model fingerprint (None when the profile has none).
        ratios: `sim.ratios.RatioTable` over `ratios.parquet`.
        ratio_rows: `ratios.parquet` as a DataFrame.
        sensitivity: `sensitivity.parquet` as a DataFrame.
        traces: `traces.parquet` as a DataFrame.
        synthetic: True when the profile is labelled synthetic (generated, not measured).
    """

    path: Path
    doc: dict
    geometry: Any
    fingerprint: str | None
    ratios: Any
    ratio_rows: pd.DataFrame = field(repr=False)
    sensitivity: pd.DataFrame = field(repr=False)
    traces: pd.DataFrame = field(repr=False)
    synthetic: bool = False

    @property
    def tasks(self) -> list[str]:
        return sorted(self.sensitivity["task"].astype(str).unique())

    @property
    def detection_limit(self) -> dict | None:
        d = self.doc.get("detection_limit")
        return d if isinstance(d, dict) else None

    @property
    def source_label(self) -> str:
        return "synthetic (generated, not measured)" if self.synthetic else "measured"


def load_profile(path: str | Path) -> ModelProfile:
    """Read a model profile directory.

    Args:
        path: directory holding `profile.json`, `ratios.parquet`, `sensitivity.parquet` and
            `traces.parquet`.

    Raises:
        ProfileError: the directory or a file is missing, of another kind or schema version, or a
            table lacks a column (the message names the file and the column).
    """
    from sim.study import load_model_source

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ProfileError(f"--profile {path}: no such directory; make one with `moesz profile "
                           f"model MODEL --out DIR`")
    doc = read_versioned_json(path / "profile.json", KIND, SCHEMA_VERSION)
    for name in ("ratios.parquet", "sensitivity.parquet", "traces.parquet"):
        if not (path / name).is_file():
            raise ProfileError(f"{path / name}: missing; the planner needs ratios, sensitivity and "
                               f"traces (rerun `moesz profile model` to complete the profile)")
    source = load_model_source(str(path))
    sens = with_matrix_column(read_table(path / "sensitivity.parquet", SENSITIVITY_COLUMNS))
    rows = with_matrix_column(read_table(path / "ratios.parquet", RATIO_COLUMNS))
    if sens.empty:
        raise ProfileError(f"{path / 'sensitivity.parquet'}: no rows; the sensitivity sweep has "
                           f"not run (rerun `moesz profile model`)")
    model = doc.get("model") or {}
    synthetic = bool(doc.get("synthetic")) or (
        "source" in rows.columns and (rows["source"] == "synthetic").any())
    return ModelProfile(path=path, doc=doc, geometry=source.geometry,
                        fingerprint=model.get("fingerprint"), ratios=source.ratios,
                        ratio_rows=rows, sensitivity=sens, traces=source.traces,
                        synthetic=synthetic)
