"""The model profile directory: `profile.json` plus parquet tables (docs/model-profile.md).

`read_profile(path)` accepts the directory or its `profile.json` and validates everything the
simulator and the planner rely on: the document's kind and schema version, its required fields,
and each table's columns. Errors name the file, the field (or column) and what was expected.
Writing is atomic (`profiles.fileio`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiles.errors import ProfileError
from profiles.fileio import atomic_write_json, atomic_write_with, read_versioned_json
from profiles.profiling.ratios import RATIO_COLUMNS

KIND = "model_profile"
SCHEMA_VERSION = 1
PROFILE_FILE = "profile.json"
RATIOS_FILE = "ratios.parquet"
RATIOS_MODEL_FILE = "ratios.json"   # the fingerprint of the model the ratios were measured on
SENSITIVITY_FILE = "sensitivity.parquet"
TRACES_FILE = "traces.parquet"
SWEEP_DB = "sweep.db"
PLOTS_DIR = "plots"

SENSITIVITY_COLUMNS = (
    "target", "target_kind", "layers", "experts", "codec", "mode", "level", "surrogate", "task",
    "n", "strict_base", "strict", "content_base", "content", "strict_change", "strict_change_low",
    "strict_change_high", "content_change", "content_change_low", "content_change_high",
    "strict_mcnemar_p", "content_mcnemar_p", "interval_method", "kl_nats", "top1_agreement",
    "stopped_early")
# `matrix` ("all", "gate_up", "down"): which matrices a point perturbed; optional, since
# profiles made before per-matrix points lack it (read as "all", `with_matrix_column`)
MATRIX_COLUMN = "matrix"
REQUIRED_FIELDS = ("model", "command", "created_utc", "split", "tasks", "prompts_per_task",
                   "codecs", "mode", "levels", "targets", "design", "baseline", "detection_limit",
                   "points_total", "points_done", "complete")


@dataclass(frozen=True)
class ModelProfile:
    """A loaded model profile. `ratios` and `sensitivity` are pandas DataFrames."""

    path: Path
    doc: dict
    ratios: Any
    sensitivity: Any

    @property
    def fingerprint(self) -> str | None:
        return self.doc["model"].get("fingerprint")

    @property
    def geometry(self) -> dict:
        return self.doc["model"]["geometry"]

    @property
    def detection_limit(self) -> dict:
        return self.doc["detection_limit"]

    @property
    def traces_path(self) -> Path | None:
        p = self.path / TRACES_FILE
        return p if p.exists() else None

    def to_json(self) -> dict:
        """The JSON of `moesz profile show --json`: the document plus both tables as records."""
        return {**self.doc, "ratios": _records(self.ratios),
                "sensitivity": _records(self.sensitivity)}


def profile_dir(path: str | os.PathLike) -> Path:
    """The profile directory for a directory or a `profile.json` path."""
    p = Path(path)
    return p.parent if p.name == PROFILE_FILE or p.suffix == ".json" else p


def write_profile_json(directory: str | os.PathLike, doc: dict) -> None:
    """Write `profile.json` atomically, with `kind` and `schema_version` first."""
    body = {"kind": KIND, "schema_version": SCHEMA_VERSION}
    body.update({k: v for k, v in doc.items() if k not in body})
    atomic_write_json(Path(directory) / PROFILE_FILE, _finite(body))


def write_table(directory: str | os.PathLike, name: str, frame) -> None:
    """Write a DataFrame as parquet atomically."""
    atomic_write_with(Path(directory) / name, lambda tmp: frame.to_parquet(tmp, index=False))


def read_profile_doc(path: str | os.PathLike) -> dict:
    """Read and validate `profile.json` (kind, schema version, required fields)."""
    d = profile_dir(path)
    file = d / PROFILE_FILE
    if not d.exists():
        raise ProfileError(f"{d}: no such model profile directory; make one with "
                           f"`moesz profile model MODEL --out {d}`")
    doc = read_versioned_json(file, KIND, SCHEMA_VERSION)
    for name in REQUIRED_FIELDS:
        if name not in doc:
            raise ProfileError(f"{file}: field {name!r} is missing; expected a model profile of "
                               f"schema version {SCHEMA_VERSION} (regenerate it with moesz)")
    model = doc["model"]
    if not isinstance(model, dict) or not isinstance(model.get("geometry"), dict):
        raise ProfileError(f"{file}: field 'model.geometry' must be an object (the model's "
                           f"geometry); regenerate the profile")
    limit = doc["detection_limit"]
    if not isinstance(limit, dict) or "half_width" not in limit:
        raise ProfileError(f"{file}: field 'detection_limit.half_width' is missing")
    return doc


def read_profile(path: str | os.PathLike) -> ModelProfile:
    """Load a model profile directory (or its profile.json) with both tables.

    Raises:
        ProfileError: missing or corrupt files, another kind or schema version, or a table
            without a required column — naming the file, the field and what was expected.
    """

    d = profile_dir(path)
    doc = read_profile_doc(d)
    ratios = read_table(d / RATIOS_FILE, RATIO_COLUMNS)
    sens = read_table(d / SENSITIVITY_FILE, SENSITIVITY_COLUMNS)
    return ModelProfile(d, doc, with_matrix_column(ratios), with_matrix_column(sens))


def with_matrix_column(frame):
    """`frame` with a `matrix` column, "all" where it is missing or empty (older profiles)."""
    if frame is None:
        return frame
    if MATRIX_COLUMN not in frame.columns:
        return frame.assign(**{MATRIX_COLUMN: "all"})
    col = frame[MATRIX_COLUMN]
    return frame.assign(**{MATRIX_COLUMN: col.where(col.notna() & (col != ""), "all")
                                       .astype(str)})


def read_table(file: Path, columns):
    """A profile's parquet table, checked to hold `columns` (errors name the file and column)."""
    import pandas as pd

    if not file.exists():
        raise ProfileError(f"{file}: missing; rerun the `moesz profile model` command that made "
                           f"this profile to complete it")
    try:
        frame = pd.read_parquet(file)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ProfileError(f"{file}: not a readable parquet table ({str(exc).splitlines()[0]}); "
                           f"delete it and rerun the profile command") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ProfileError(f"{file}: column {missing[0]!r} is missing; expected the columns of "
                           f"schema version {SCHEMA_VERSION} (docs/model-profile.md)")
    return frame


def _records(frame) -> list[dict]:
    if frame is None:
        return []
    return [_finite(r) for r in json.loads(frame.to_json(orient="records"))]


def _finite(obj: Any) -> Any:
    """NaN and infinities become None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
