"""A simulation study as `moesz simulate` runs it: resolve the model, traces and ratios, then
simulate every (cache policy, GPU budget, host budget) combination, each with the closed-form
prediction next to it.

`--model` is a model profile directory (`profile.json`, with `ratios.parquet` and
`traces.parquet` used when present) or anything `profiles.models.resolve_geometry` accepts; for
a weightless geometry the compressed sizes come from `sim.ratios.SyntheticRatios`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from profiles.errors import ConfigError, MoeszError, ProfileError
from profiles.fileio import read_versioned_json
from profiles.hardware import HardwareProfile
from profiles.serving import MemBudget, ServingConfig
from sim.api import load_traces, make_workload, simulate
from sim.closed_form import ClosedFormModel
from sim.costs import build_costs
from sim.engine import SimOptions, Simulation, with_disk_override
from sim.ratios import RatioTable, SyntheticRatios
from sim.reuse import reuse_stats
from sim.results import SimResult
from sim.synthetic import SyntheticSpec
from sim.timing import TimeModel
from sim.workload import with_placement

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModelSource:
    geometry: Any
    ratios: Any  # RatioTable or SyntheticRatios
    traces: pd.DataFrame | None  # recorded traces found with the model (profile directory)
    traces_path: str | None
    label: str


def _geometry_from_dict(d: dict, where: str):
    from profiles.models import ModelGeometry

    names = {f.name for f in fields(ModelGeometry)}
    kw = {k: v for k, v in d.items() if k in names}
    missing = sorted(names - set(kw))
    if missing:
        raise ProfileError(f"{where}: geometry lacks field(s) {', '.join(missing)}")
    kw["moe_layers"] = tuple(kw["moe_layers"])
    shapes = kw["expert_tensor_shapes"]
    items = shapes.items() if isinstance(shapes, dict) else shapes
    kw["expert_tensor_shapes"] = tuple((str(n), tuple(int(x) for x in s)) for n, s in items)
    return ModelGeometry(**kw)


def load_model_source(model: str, seed: int = 0) -> ModelSource:
    """Resolve `--model`: a model profile directory, or a geometry spec."""
    path = Path(model).expanduser()
    prof = path / "profile.json"
    if path.is_dir() and prof.exists():
        doc = read_versioned_json(prof, "model_profile", 1)
        geo = doc.get("geometry") or (doc.get("model") or {}).get("geometry")
        if isinstance(geo, dict):
            geometry = _geometry_from_dict(geo, str(prof))
        else:
            spec = (doc.get("model") or {}).get("spec")
            if not spec:
                raise ProfileError(f"{prof}: has neither 'geometry' nor 'model.spec'; regenerate "
                                   f"it with `moesz profile model`")
            from profiles.models import resolve_geometry

            geometry = resolve_geometry(spec)
        ratios_path = path / "ratios.parquet"
        ratios = RatioTable.from_parquet(ratios_path) if ratios_path.exists() else SyntheticRatios(seed)
        tpath = path / "traces.parquet"
        traces = load_traces(tpath) if tpath.exists() else None
        return ModelSource(geometry, ratios, traces, str(tpath) if traces is not None else None,
                           f"model profile {path}")
    from profiles.models import resolve_geometry

    geometry = resolve_geometry(model)
    return ModelSource(geometry, SyntheticRatios(seed), None, None, model)


@dataclass(frozen=True)
class StudyRow:
    varied: dict[str, str]
    result: SimResult
    closed_form_tokens_per_s: float | None
    closed_form_notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {**self.varied, **self.result.to_dict()}
        d["closed_form_tokens_per_s"] = self.closed_form_tokens_per_s
        d["closed_form_notes"] = list(self.closed_form_notes)
        return d


@dataclass(frozen=True)
class Study:
    rows: list[StudyRow]
    workload_source: str
    model_label: str
    policy_label: str
    first_simulation: Simulation | None = field(default=None, repr=False)


def run_study(*, hardware: HardwareProfile, source: ModelSource, policy: Any, policy_label: str,
              serving: ServingConfig, gpu_budgets: Sequence[MemBudget],
              host_budgets: Sequence[MemBudget] = (MemBudget(),),
              caches: Sequence[str] | None = None, traces_path: str | None = None,
              synthetic: SyntheticSpec | None = None, options: SimOptions = SimOptions(),
              placement_traces_path: str | None = None,
              progress: Progress | None = None) -> Study:
    """Simulate every (cache, GPU budget, host budget) combination under one policy.

    Traces: `traces_path` if given, else `synthetic`, else the profile directory's traces, else
    synthetic `zipf:1.1`. Static placements rank experts by `placement_traces_path` when given,
    else by the replayed traces (an oracle). The first run keeps its `Simulation` (for the
    timeline when `options.record`).
    """
    g = source.geometry
    if traces_path is not None and synthetic is not None:
        raise ConfigError("give --traces or --synthetic, not both")
    if traces_path is not None:
        wl = make_workload(g, serving, traces=load_traces(traces_path), source=traces_path)
    elif synthetic is None and source.traces is not None:
        wl = make_workload(g, serving, traces=source.traces, source=source.traces_path or "traces")
    else:
        wl = make_workload(g, serving, synthetic=synthetic or SyntheticSpec())
    if placement_traces_path is not None:
        wl = with_placement(wl, load_traces(placement_traces_path), source=placement_traces_path)
    if hasattr(policy, "check"):
        shapes = getattr(g, "expert_tensor_shapes", None)
        policy.check(g.moe_layers, g.experts_per_layer, None, where=policy_label,
                     tensor_names=[n for n, _ in shapes] if shapes else None,
                     architecture=getattr(g, "architecture", None))
    hardware = with_disk_override(hardware, options)   # the closed form reads the same disk
    times = TimeModel(hardware, g, serving.batch_size)
    stats = reuse_stats(wl)
    caches = list(caches or [serving.cache_policy])
    combos = [(c, gb, hb) for c in caches for gb in gpu_budgets for hb in host_budgets]
    costs = build_costs(g, policy, hardware, serving, source.ratios)
    rows, first = [], None
    for i, (cache, gb, hb) in enumerate(combos):
        sv = ServingConfig.from_dict({**serving.to_dict(), "cache_policy": cache}).with_budgets(gb, hb)
        run = simulate(geometry=g, hardware=hardware, serving=sv, costs=costs, workload=wl,
                       options=options if i == 0 else SimOptions(**{**options.__dict__,
                                                                      "record": False}),
                       times=times)
        first = first or run.simulation
        try:
            cf = ClosedFormModel(hardware, g, sv, wl, stats=stats, times=times)
            cf_tps, cf_notes = cf.tokens_per_s_costs(costs), tuple(cf.notes)
        except MoeszError as exc:
            cf_tps, cf_notes = None, (f"closed form unavailable: {exc}",)
        rows.append(StudyRow({"policy": policy_label, "cache": cache, "gpu_mem": str(gb),
                              "host_mem": str(hb)}, run.result, cf_tps, cf_notes))
        if progress:
            progress(i + 1, len(combos), f"{cache}, GPU {gb}, host {hb}")
    return Study(rows, wl.source, source.label, policy_label, first)
