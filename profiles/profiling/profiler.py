"""`profile_model`: ratios, routing traces, baseline and the sensitivity sweep of one model -> DIR.

Order of work (each step resumes from what DIR already holds):

1. load the model; check DIR is not a profile of another model;
2. ratios of every MoE layer x codec x level on the real weights (`ratios.parquet`);
3. routing traces on the evaluation prompts (`traces.parquet`); the same greedy generations are
   the unperturbed baseline (`baseline.json`), so the baseline costs nothing extra and is
   evaluated once;
4. the sensitivity sweep over the grid's points, as a shared Optuna study (`profiles.profiling.sweep`);
   `sensitivity.parquet` and `profile.json` are rewritten after every point;
5. plots.

Evaluation runs on the CPU with `threads` intra-op threads (1 by default: the built-in model's
matrices are small, and on a shared or oversubscribed machine extra threads spin instead of work;
run one worker per core instead) and, on the CPU, in float32 on a copy of the (perturbed) bf16
model — the weights stay the checkpoint's bf16 values, only the arithmetic is wider, for the
baseline and every point alike — because bf16 matrix products are several times slower than fp32
on CPUs without bf16 units.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from profiles.errors import ConfigError, ProfileError
from profiles.profiling import format as fmt
from profiles.profiling.grid import (PAPER_LEVELS, GridSpec, Point, build_points, parse_experts,
                                     parse_groups, parse_layers, parse_levels)

Progress = Callable[[int, int, str], None]
DEFAULT_LIMIT = 300
STUDY_NAME = "moesz-sensitivity"
BASELINE_FILE = "baseline.json"


@dataclass(frozen=True)
class ProfileRequest:
    """Everything `moesz profile model` takes (strings as on the command line are accepted)."""

    model: str
    out: Path
    codecs: str | Sequence[str] = "szp,sz3"
    mode: str = "meanabs"
    levels: str | Sequence[float] = "0.1,0.3,1,2,3"
    layers: str = "all"
    groups: str = "thirds"
    target: str = "all"
    limit: int | None = None
    tasks: str | Sequence[str] | None = None
    split: str = "profile"
    design: str = "grid"
    storage: str | None = None
    max_evals: int | None = None
    ratio_sample: int | None = None
    seed: int = 0
    wait_for_others: bool = True
    command: str | None = None
    threads: int | None = 1
    compute_dtype: str = "auto"          # auto (fp32 on CPU), or the model's own
    batch_size: int = 256
    catastrophic_drop: float | None = 0.5
    heartbeat_s: float = 10.0
    grace_s: float = 120.0


@dataclass(frozen=True)
class ProfileResult:
    """What a `profile_model` call did; `profile` is the directory as it stands now."""

    profile: fmt.ModelProfile
    ran: tuple[str, ...]
    points_total: int
    points_done: int
    seconds: float
    sweep_seconds: float
    warnings: tuple[str, ...] = ()
    evaluated: int = 0      # points of `ran` that generated answers (not reused, not unchanged)

    @property
    def complete(self) -> bool:
        return self.points_done >= self.points_total

    @property
    def evals_per_s(self) -> float:
        """Points that generated answers, per second of sweep (reused points excluded)."""
        return self.evaluated / self.sweep_seconds if self.sweep_seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"out": str(self.profile.path), "points_total": self.points_total,
                "points_done": self.points_done, "complete": self.complete,
                "ran_now": len(self.ran), "evaluated_now": self.evaluated,
                "reused_now": len(self.ran) - self.evaluated, "seconds": self.seconds,
                "sweep_seconds": self.sweep_seconds,
                "evaluations_per_s": {"value": self.evals_per_s, "source": "measured"},
                "detection_limit": self.profile.detection_limit,
                "warnings": list(self.warnings)}


def profile_model(request: ProfileRequest, progress: Progress | None = None) -> ProfileResult:
    """Profile a model into `request.out` (see the module docstring); rerunning resumes.

    Raises:
        ConfigError: bad options (levels, layers, groups, target, codecs, limit, storage).
        ModelError: the model cannot be loaded.
        ProfileError: `out` holds a profile of another model, or the storage holds a sweep made
            with other settings.
    """
    t0 = time.perf_counter()
    with _threads(request.threads):
        return _profile(request, progress, t0)


@contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"threads {n} must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _profile(req: ProfileRequest, progress: Progress | None, t0: float) -> ProfileResult:
    from profiles.tasks import check_task_names

    limit = DEFAULT_LIMIT if req.limit is None else req.limit
    if limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1 prompt per task")
    tasks = check_task_names(_split_list(req.tasks) or None)
    out = Path(req.out)
    _check_options(req)               # fail before the (slow) model load where possible
    _report(progress, 0, 1, "loading model")
    loaded = _load(req.model)
    g = loaded.geometry
    spec = _grid_spec(req, g)
    points = build_points(spec, g.moe_layers, g.experts_per_layer)
    keys = [p.key for p in points]
    by_key = {p.key: p for p in points}
    _check_out(out, loaded)
    out.mkdir(parents=True, exist_ok=True)
    compute = _compute_dtype(req.compute_dtype, loaded)

    ratios = _ratios(out, loaded, spec, req, progress)
    warnings: list[str] = []
    evalset = {"split": req.split, "tasks": tasks, "limit": limit, "seed": req.seed}
    view = _compute_view(loaded, compute)
    baseline, traces = _baseline_and_traces(out, view, evalset, req, progress)

    from profiles.evaluation import base_distributions, builtin_calibration
    from profiles.profiling.sensitivity import SensitivityRunner, detection_limit, top_experts
    from profiles.profiling.sweep import Sweep, open_storage

    calib = builtin_calibration(view.model, view.tokenizer, per_task=16, split=req.split,
                                seed=req.seed)
    base_fid = base_distributions(view.model, calib)
    top = top_experts(traces, g.moe_layers, g.experts_per_layer)
    storage = open_storage(req.storage, out / fmt.SWEEP_DB)
    identity = {"fingerprint": loaded.fingerprint, "split": req.split, "tasks": tasks,
                "prompts_per_task": limit, "seed": req.seed, "compute_dtype": compute,
                "catastrophic_drop": req.catastrophic_drop}
    sweep = Sweep(storage, STUDY_NAME, identity, heartbeat_s=req.heartbeat_s, grace_s=req.grace_s)
    runner = SensitivityRunner(loaded, baseline, base_fid, top, seed=req.seed,
                               batch_size=req.batch_size, catastrophic_drop=req.catastrophic_drop)
    base_digests = _layer_digests(loaded, g.moe_layers)
    meta = _meta(req, loaded, spec, points, tasks, limit, compute, baseline)

    def run_point(key: str) -> tuple[float, list[dict]]:
        point = by_key[key]
        return _run_point(point, runner, view, loaded, compute, sweep, base_digests)

    def write(completed: dict) -> None:
        _write_outputs(out, meta, completed, keys, baseline)

    write(sweep.completed())
    ts = time.perf_counter()
    stats = sweep.run(keys, run_point, max_evals=req.max_evals, on_result=write,
                      wait_for_others=req.wait_for_others,
                      progress=None if progress is None else
                      (lambda d, t, label: progress(d, t, f"sweep {label}")))
    sweep_s = time.perf_counter() - ts
    completed = sweep.completed()
    write(completed)
    _plots(out, progress)
    prof = fmt.read_profile(out)
    lim = prof.detection_limit
    if lim["half_width"] > 0.01:
        warnings.append(f"the detection limit is ±{lim['half_width']:.4f} (content, mean over "
                        f"tasks): a one-point budget (0.01) cannot be checked with "
                        f"{limit} prompts per task; rerun with a larger --limit")
    if not stats.complete:
        warnings.append(f"{stats.points_total - stats.completed_total} of {stats.points_total} "
                        f"points are not done; rerun the same command to resume")
    reused = sum(1 for k in stats.ran if completed.get(k) and (
        completed[k][0].get("reused_from") or completed[k][0].get("weights_unchanged")))
    return ProfileResult(prof, stats.ran, stats.points_total, stats.completed_total,
                         time.perf_counter() - t0, sweep_s, tuple(warnings),
                         evaluated=len(stats.ran) - reused)


# --- steps ----------------------------------------------------------------------------------------

def _split_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _load(spec: str):
    """load_model with transformers' own progress bars off (moesz reports progress itself)."""
    from transformers.utils import logging as hf_logging

    from profiles.models import load_model

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(spec)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_options(req: ProfileRequest) -> None:
    """Options that need no model: levels, codecs, design, counts."""
    from profiles.codecs import get_codec
    from profiles.codecs.bounds import check_request
    from profiles.errors import MoeszError

    if req.max_evals is not None and req.max_evals < 0:
        raise ConfigError(f"--max-evals {req.max_evals} is negative; give 0 or more")
    if req.ratio_sample is not None and req.ratio_sample < 1:
        raise ConfigError(f"--ratio-sample {req.ratio_sample} must be at least 1 expert per layer")
    if req.design not in ("grid", "paper"):
        raise ConfigError(f"--design {req.design!r} is unknown; choose grid or paper")
    codecs = _split_list(req.codecs)
    if not codecs:
        raise ConfigError("--codecs is empty; give codecs like szp,sz3")
    for c in codecs:
        try:
            codec = get_codec(c)
        except MoeszError as exc:
            raise ConfigError(str(exc)) from None
        ok, why = codec.availability()
        if not ok:
            raise ConfigError(f"codec {c!r} is not available here: {why}")
    try:
        for lv in parse_levels(req.levels):
            check_request(req.mode, lv)
    except ConfigError:
        raise
    except MoeszError as exc:
        raise ConfigError(str(exc)) from None


def _grid_spec(req: ProfileRequest, g) -> GridSpec:
    codecs = tuple(_split_list(req.codecs))
    levels = parse_levels(req.levels) if req.design != "paper" else PAPER_LEVELS
    layers = parse_layers(req.layers, g.moe_layers)
    if req.design == "paper":   # the study's G1-G3 unless groups are named explicitly
        groups = {} if req.groups.strip() in ("thirds", "none", "") else \
            parse_groups(req.groups, g.moe_layers)
    else:
        groups = parse_groups(req.groups, g.moe_layers)
    return GridSpec(codecs=codecs, mode=req.mode, levels=levels, layers=layers, groups=groups,
                    experts=parse_experts(req.target, g.experts_per_layer), design=req.design)


def _check_out(out: Path, loaded) -> None:
    if not (out / fmt.PROFILE_FILE).exists():
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a directory")
        return
    doc = fmt.read_profile_doc(out)
    theirs = doc["model"].get("fingerprint")
    if theirs != loaded.fingerprint:
        raise ProfileError(f"{out} holds a profile of another model (fingerprint {theirs}, this "
                           f"model's is {loaded.fingerprint}); use another --out")


def _compute_dtype(requested: str, loaded) -> str:
    if requested not in ("auto", "native", "fp32"):
        raise ConfigError(f"compute dtype {requested!r} is unknown; choose auto, native or fp32")
    dtype = next(loaded.model.parameters()).dtype
    on_cpu = next(loaded.model.parameters()).device.type == "cpu"
    if requested == "fp32" or (requested == "auto" and on_cpu and dtype in (torch.bfloat16,
                                                                            torch.float16)):
        return "fp32"
    return str(dtype).replace("torch.", "")


def _compute_view(loaded, compute: str):
    """The model evaluation runs on: the loaded one, or an fp32 copy of its current weights."""
    if compute != "fp32" or next(loaded.model.parameters()).dtype == torch.float32:
        return loaded
    from profiles.models.expert_map import build_expert_map

    model = copy.deepcopy(loaded.model).float().eval()
    return replace(loaded, model=model, expert_map=build_expert_map(model, loaded.spec))


def _ratios(out: Path, loaded, spec: GridSpec, req: ProfileRequest, progress):
    import pandas as pd

    from profiles.profiling.ratios import measure_ratios

    path = out / fmt.RATIOS_FILE
    codecs = [c for c in spec.codecs if c != "noise"]
    done, old = set(), None
    if path.exists():
        try:
            old = pd.read_parquet(path)
            done = {(int(r.layer), r.codec, None if pd.isna(r.level) else float(r.level))
                    for r in old.itertuples()}
        except Exception:
            old = None
    sample = req.ratio_sample if req.ratio_sample is not None else 16
    layers = spec.layers if spec.design == "grid" else None
    new = measure_ratios(loaded, codecs, spec.mode, spec.levels, sample=sample, seed=req.seed,
                         layers=layers, done_keys=done, progress=None if progress is None else
                         (lambda d, t, label: progress(d, t, label)))
    frame = new if old is None or len(old) == 0 else pd.concat([old, new], ignore_index=True)
    fmt.write_table(out, fmt.RATIOS_FILE, frame)
    return frame


def _baseline_and_traces(out: Path, view, evalset: dict, req: ProfileRequest, progress):
    from profiles.evaluation import EvalResult
    from profiles.profiling.sensitivity import baseline_from_recording
    from profiles.traces import read_traces, record_traces, write_traces

    bpath, tpath = out / BASELINE_FILE, out / fmt.TRACES_FILE
    if bpath.exists() and tpath.exists():
        try:
            base = EvalResult.load(bpath)
            if (base.fingerprint, base.split, base.limit, base.seed,
                    [t.task for t in base.tasks]) == (view.fingerprint, evalset["split"],
                                                      evalset["limit"], evalset["seed"],
                                                      list(evalset["tasks"])):
                return base, read_traces(tpath)
        except ProfileError:
            pass
    rec = record_traces(view, evalset["tasks"], evalset["split"], evalset["limit"],
                        evalset["seed"], batch_size=req.batch_size,
                        progress=None if progress is None else
                        (lambda d, t, label: progress(d, t, f"baseline and traces: {label}")))
    base = baseline_from_recording(view, rec, evalset["split"], evalset["limit"], evalset["seed"])
    write_traces(rec.frame, tpath)
    base.save(bpath)
    return base, rec.frame


def _layer_digests(loaded, layers) -> dict[int, str]:
    """blake2b of each MoE layer's routed expert bytes (to recognise identical perturbations)."""
    out = {}
    for layer in layers:
        h = hashlib.blake2b(digest_size=16)
        for ref in (r for r in loaded.expert_map.experts if r.layer == layer):
            for name in sorted(ref.tensors):
                t = ref.tensors[name].detach().contiguous()
                h.update(t.view(torch.uint8).numpy().tobytes())
        out[layer] = h.hexdigest()
    return out


def _run_point(point: Point, runner, view, loaded, compute: str, sweep, base_digests
               ) -> tuple[float, list[dict]]:
    """Apply the point's policy, recognise weights seen before, evaluate on the compute view."""
    from profiles.policy import apply_policy
    from profiles.profiling.sensitivity import point_policy

    policy, surrogate = point_policy(point, runner.top, loaded.fingerprint)
    with apply_policy(loaded, policy, surrogate=surrogate, seed=runner.seed, measure_bytes=False):
        digests = _layer_digests(loaded, point.layers)
        digest = hashlib.blake2b("|".join(f"{k}:{v}" for k, v in sorted(digests.items()))
                                 .encode(), digest_size=16).hexdigest()
        same = _same_weights(sweep, digest)
        if same is not None:
            value, rows = same
            rows = [{**r, **_point_fields(point), "reused_from": r.get("point_key"),
                     "point_key": point.key, "weights_digest": digest} for r in rows]
            return value, rows
        unchanged = all(digests[x] == base_digests[x] for x in point.layers)
        # the fp32 view is a fresh copy of the weights as perturbed now
        target = _compute_view(loaded, compute) if view is not loaded else loaded
        value, rows = runner.evaluate_current(point, target, unchanged=unchanged)
    rows = [{**r, "point_key": point.key, "weights_digest": digest, "reused_from": None,
             "weights_unchanged": unchanged} for r in rows]
    return value, rows


def _point_fields(point: Point) -> dict:
    return {"target": point.target, "target_kind": point.target_kind,
            "layers": ",".join(map(str, point.layers)), "experts": point.experts,
            "codec": point.codec, "mode": point.mode,
            "level": float("nan") if point.level is None else float(point.level),
            "surrogate": point.surrogate}


def _same_weights(sweep, digest: str):
    for key, rows in sweep.completed().items():
        if rows and rows[0].get("weights_digest") == digest and not rows[0].get("reused_from"):
            return sum(r["content_change"] for r in rows) / len(rows), rows
    return None


def _meta(req, loaded, spec: GridSpec, points, tasks, limit, compute, baseline) -> dict:
    from profiles.hardware.measure import cpu_model, package_versions

    targets = sorted({p.target for p in points}, key=lambda t: (t != "all", t))
    return {
        "model": {"spec": req.model, "fingerprint": loaded.fingerprint,
                  "geometry": loaded.geometry.to_dict()},
        "command": req.command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"hostname": socket.gethostname(), "cpu": cpu_model(),
                 "threads": torch.get_num_threads()},
        "packages": package_versions(),
        "split": req.split, "tasks": list(tasks), "prompts_per_task": limit, "seed": req.seed,
        "codecs": list(spec.codecs), "mode": spec.mode, "levels": list(spec.levels),
        "targets": targets, "experts": spec.experts,
        "groups": {k: list(v) for k, v in spec.groups.items()},
        "design": spec.design, "compute_dtype": compute,
        "catastrophic_drop": req.catastrophic_drop,
        "ratio_sample": req.ratio_sample if req.ratio_sample is not None else 16,
        "storage": req.storage or f"sqlite:///{(Path(req.out) / fmt.SWEEP_DB).resolve()}",
        "baseline": {t.task: {"strict": t.strict.to_dict(), "content": t.content.to_dict(),
                              "n": t.n} for t in baseline.tasks},
        "points": [p.key for p in points],
    }


def _write_outputs(out: Path, meta: dict, completed: dict, keys: Sequence[str], baseline) -> None:
    import pandas as pd

    from profiles.profiling.sensitivity import detection_limit

    rows = [r for k in keys if k in completed for r in completed[k]]
    frame = pd.DataFrame(rows)
    for col in fmt.SENSITIVITY_COLUMNS:
        if col not in frame.columns:
            frame[col] = pd.Series(dtype="float64")
    front = list(fmt.SENSITIVITY_COLUMNS)
    frame = frame[front + [c for c in frame.columns if c not in front]]
    fmt.write_table(out, fmt.SENSITIVITY_FILE, frame)
    done = [completed[k] for k in keys if k in completed]
    doc = {**meta, "detection_limit": detection_limit(baseline, done),
           "points_total": len(keys), "points_done": len(done),
           "complete": len(done) >= len(keys)}
    fmt.write_profile_json(out, doc)


def _plots(out: Path, progress) -> None:
    import pandas as pd

    from profiles.profiling.plots import ratio_curves, sensitivity_heatmap

    _report(progress, 0, 1, "plots")
    ratios = pd.read_parquet(out / fmt.RATIOS_FILE)
    sens = pd.read_parquet(out / fmt.SENSITIVITY_FILE)
    ratio_curves(ratios, out / fmt.PLOTS_DIR / "ratios.png")
    sensitivity_heatmap(sens, out / fmt.PLOTS_DIR / "sensitivity_content.png", "content")
    sensitivity_heatmap(sens, out / fmt.PLOTS_DIR / "sensitivity_strict.png", "strict")
    _report(progress, 1, 1, "plots")


def _report(progress, done: int, total: int, label: str) -> None:
    if progress is not None:
        progress(done, total, label)
