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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from profiles.errors import ConfigError, MoeszError, ProfileError
from profiles.evaluation.textmetrics import DEFAULT_MAX_TOKENS
from profiles.evaluation.threads import torch_threads
from profiles.profiling import format as fmt
from profiles.profiling import steps
from profiles.profiling.grid import (MATRIX_KINDS, PAPER_LEVELS, GridSpec, build_points,
                                     parse_experts, parse_groups, parse_layers, parse_levels,
                                     parse_matrices)

Progress = Callable[[int, int, str], None]
DEFAULT_LIMIT = 300
STUDY_NAME = "moesz-sensitivity"


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
    host_mem: int | None = None          # bytes: evaluate with the routed experts on disk
    bench: Sequence[str] = ()            # user JSONL benchmarks (profile half of each)
    template: str | None = None          # prompt template of the benchmarks
    extract: str | None = None           # answer-extraction pattern of the benchmarks
    max_new_tokens: int = 256            # generation budget per benchmark item
    text: str | None = None              # text corpus for kl and ppl (profile half)
    text_tokens: int | None = DEFAULT_MAX_TOKENS  # text half's predicted tokens (None: auto)
    lm_eval: str | None = None           # lm-evaluation-harness tasks: YAML paths or names
    baselines: str | Sequence[str] = ""  # formats users run, measured on the whole model only
    per_matrix: bool = False             # also gate_up-only and down-only points, ratios per matrix
    matrices: str | Sequence[str] | None = None  # the kinds per-matrix points perturb (implies
    #                                              per_matrix; None: gate_up,down)


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
    storage_seconds: float = 0.0   # of sweep_seconds: in sweep storage calls (measured)
    points_seconds: float = 0.0    # of sweep_seconds: running this worker's points (measured)

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
                "sweep_storage_seconds": self.storage_seconds,
                "sweep_points_seconds": self.points_seconds,
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
    with torch_threads(request.threads):
        return _profile(request, progress, t0)


def _profile(req: ProfileRequest, progress: Progress | None, t0: float) -> ProfileResult:
    from profiles.profiling.metrics import eval_spec, metrics_record

    limit = DEFAULT_LIMIT if req.limit is None else req.limit
    if limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1 prompt per task")
    spec_eval = eval_spec(_split_list(req.tasks) or None, tuple(req.bench), req.template,
                          req.extract, req.max_new_tokens, req.text, req.text_tokens,
                          req.lm_eval, split=req.split)
    tasks = list(spec_eval.tasks)
    out = Path(req.out)
    _check_options(req)               # fail before the (slow) model load where possible
    _report(progress, 0, 1, "loading model")
    loaded = _load(req.model, req.host_mem)
    if spec_eval.lm_evals:
        from profiles.evaluation.lmeval import check_tokenizer

        try:
            check_tokenizer(loaded.tokenizer, req.lm_eval)
        except MoeszError as exc:
            raise ConfigError(str(exc)) from None
    g = loaded.geometry
    spec = _grid_spec(req, g)
    points = build_points(spec, g.moe_layers, g.experts_per_layer)
    keys = [p.key for p in points]
    by_key = {p.key: p for p in points}
    compute = _compute_dtype(req.compute_dtype, loaded)
    evalset = {"split": req.split, "tasks": tasks, "limit": limit, "seed": req.seed,
               **spec_eval.identity()}
    _check_out(out, loaded, evalset)
    try:
        corpus = spec_eval.corpus(loaded, req.split)
    except MoeszError as exc:   # the file, or a tokenizer that cannot encode it
        raise ConfigError(str(exc)) from None

    from profiles.evaluation.textmetrics import builtin_corpus, text_reference
    from profiles.profiling.sensitivity import SensitivityRunner, top_experts
    from profiles.profiling.sweep import Sweep, open_storage

    # the storage's settings are checked before anything in DIR is written
    storage = open_storage(req.storage, out / fmt.SWEEP_DB)
    identity = {"fingerprint": loaded.fingerprint, "split": req.split, "tasks": tasks,
                "prompts_per_task": limit, "seed": req.seed, "compute_dtype": compute,
                "catastrophic_drop": req.catastrophic_drop}
    # absent otherwise: older sweeps keep matching
    if spec_eval.benches or spec_eval.text or spec_eval.lm_evals:
        identity.update(spec_eval.identity())
    sweep = Sweep(storage, STUDY_NAME, identity, heartbeat_s=req.heartbeat_s, grace_s=req.grace_s)
    out.mkdir(parents=True, exist_ok=True)

    steps.ratios_step(out, loaded, spec, req, progress)
    warnings: list[str] = []
    view = steps.compute_view(loaded, compute)
    baseline, traces = steps.baseline_and_traces(out, view, evalset, req, progress, spec_eval,
                                                 corpus)
    if corpus is None:
        corpus = builtin_corpus(view.tokenizer, req.split, per_task=16, seed=req.seed,
                                model=view.model)
    base_fid = text_reference(view.model, corpus,
                              progress=None if progress is None else
                              (lambda d, t, label: progress(d, t, label)))
    top = top_experts(traces, g.moe_layers, g.experts_per_layer)
    runner = SensitivityRunner(loaded, baseline, base_fid, top, seed=req.seed,
                               batch_size=req.batch_size, catastrophic_drop=req.catastrophic_drop,
                               benches={b.name: b for b in spec_eval.benches},
                               lm_evals={t.name: t for t in spec_eval.lm_evals})
    base_digests = steps.layer_digests(loaded, g.moe_layers)
    meta = steps.profile_meta(req, loaded, spec, points, spec_eval.task_names(), limit, compute,
                              baseline, metrics_record(spec_eval, corpus.describe()))

    def run_point(key: str) -> tuple[float, list[dict]]:
        point = by_key[key]
        return steps.run_point(point, runner, view, loaded, compute, sweep, base_digests)

    def write(completed: dict) -> None:
        steps.write_outputs(out, meta, completed, keys, baseline)

    write(sweep.completed())
    ts = time.perf_counter()
    stats = sweep.run(keys, run_point, max_evals=req.max_evals, on_result=write,
                      wait_for_others=req.wait_for_others,
                      progress=None if progress is None else
                      (lambda d, t, label: progress(d, t, f"sweep {label}")))
    sweep_s = time.perf_counter() - ts
    completed = sweep.completed()
    write(completed)
    steps.plots_step(out, progress)
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
                         evaluated=len(stats.ran) - reused, storage_seconds=stats.storage_s,
                         points_seconds=stats.points_s)


def profile_ratios(request: ProfileRequest, progress: Progress | None = None):
    """Only the ratio step of `profile_model`, streamed from the checkpoint's files: each sampled
    expert read, round-tripped through every codec and level, and dropped, so no model is built
    and memory stays at one expert plus codec buffers. The ratios land in `request.out` and a
    later full `profile_model` into the same directory reuses them.

    Returns:
        (the ratio table of `out`, seconds).

    Raises:
        ConfigError: bad options; ModelError: the checkpoint cannot be read; ProfileError: `out`
            holds a profile of another model.
    """
    from profiles.models.source import FileExperts

    t0 = time.perf_counter()
    _check_options(request)
    out = Path(request.out)
    src = FileExperts.open(request.model)
    spec = _grid_spec(request, src.geometry)
    if (out / fmt.PROFILE_FILE).exists():
        _check_fingerprint_only(out, src.fingerprint)
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(request.threads):
        frame = steps.ratios_step(out, src, spec, request, progress)
    return frame, time.perf_counter() - t0


def _check_fingerprint_only(out: Path, fingerprint: str) -> None:
    theirs = fmt.read_profile_doc(out)["model"].get("fingerprint")
    if theirs != fingerprint:
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(theirs, fingerprint, f"the profile in {out}")
        raise ProfileError(f"{out} holds a profile of another model "
                           f"({reason or f'fingerprint {theirs}'}); use another --out")


# --- steps ----------------------------------------------------------------------------------------

def _split_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _load(spec: str, host_mem: int | None = None):
    """load_model with transformers' own progress bars off (moesz reports progress itself); with
    `host_mem`, the routed experts stay on disk (`profiles.models.offload`)."""
    from transformers.utils import logging as hf_logging

    from profiles.models import load_model

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(spec, host_mem=host_mem, offload=host_mem is not None)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_options(req: ProfileRequest) -> None:
    """Options that need no model: levels, codecs, design, counts."""
    from profiles.codecs import get_codec
    from profiles.codecs.bounds import check_request
    from profiles.errors import MoeszError

    if req.matrices is not None:
        parse_matrices(req.matrices)
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
    for c in _split_list(req.baselines):
        try:
            codec = get_codec(c)
        except MoeszError as exc:
            raise ConfigError(f"--baselines: {exc}") from None
        if codec.error_bounded or c in ("raw", "lossless", "rtn8", "rtn4"):
            raise ConfigError(f"--baselines {c!r}: baselines are formats users run without a "
                              f"bound (gq, nf4, mxfp4, q2_k-q6_k, q8_0); lossless, rtn8 and rtn4 "
                              f"are always measured, error-bounded codecs go in --codecs")
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
    if req.matrices is None:   # the model's own kinds: gate, up, down where experts keep them apart
        from profiles.matrices import model_kinds

        have = model_kinds(n for n, _ in g.expert_tensor_shapes)
        matrices = MATRIX_KINDS if "gate_up" in have else tuple(
            k for k in ("gate", "up", "down") if k in have)
    else:
        matrices = parse_matrices(req.matrices)
    per_matrix = req.per_matrix or req.matrices is not None
    if per_matrix:   # gate and up of a fused gate_up_proj need the architecture's order
        from profiles.policy import Policy, StorageSpec

        Policy(matrices={(None, None, m): StorageSpec() for m in matrices}).check(
            g.moe_layers, g.experts_per_layer, None, where="--matrices",
            tensor_names=[n for n, _ in g.expert_tensor_shapes], architecture=g.architecture)
    return GridSpec(codecs=codecs, mode=req.mode, levels=levels, layers=layers, groups=groups,
                    experts=parse_experts(req.target, g.experts_per_layer), design=req.design,
                    baselines=tuple(_split_list(req.baselines)), per_matrix=per_matrix,
                    matrices=matrices)


def _check_out(out: Path, loaded, evalset: dict) -> None:
    """Refuse an `out` that holds a profile of another model or evaluation set (before writing)."""
    if not (out / fmt.PROFILE_FILE).exists():
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a directory")
        return
    doc = fmt.read_profile_doc(out)
    theirs = doc["model"].get("fingerprint")
    if theirs != loaded.fingerprint:
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(theirs, loaded.fingerprint, f"the profile in {out}")
        raise ProfileError(f"{out} holds a profile of another model "
                           f"({reason or f'fingerprint {theirs}'}); use another --out")
    names = list(evalset["tasks"]) + [b["name"] for b in evalset.get("benches", [])] + \
        [t["name"] for t in evalset.get("lm_eval", [])]
    for field, want in (("split", evalset["split"]), ("tasks", names),
                        ("prompts_per_task", evalset["limit"]), ("seed", evalset["seed"])):
        if doc.get(field) != want:
            raise ProfileError(f"{out} was profiled with {field}={doc.get(field)!r}, this run "
                               f"asks for {want!r}; use another --out, or rerun with the same "
                               f"settings")
    have = (doc.get("metrics") or {}).get("text")
    want = evalset.get("text")
    if (have or {}).get("sha256") != (want or {}).get("sha256") and (have or want):
        raise ProfileError(f"{out} was profiled with text {(have or {}).get('path')!r}, this run "
                           f"asks for {(want or {}).get('path')!r} (or the file changed); use "
                           f"another --out, or rerun with the same --text")


def _compute_dtype(requested: str, loaded) -> str:
    if requested not in ("auto", "native", "fp32"):
        raise ConfigError(f"compute dtype {requested!r} is unknown; choose auto, native or fp32")
    dtype = next(loaded.model.parameters()).dtype
    on_cpu = next(loaded.model.parameters()).device.type == "cpu"
    if loaded.offload is not None:   # experts on disk: no second, wider copy of the model
        if requested == "fp32" and dtype != torch.float32:
            raise ConfigError("compute dtype fp32 needs the model in memory; with --host-mem "
                              "the profile evaluates in the model's own dtype")
        return str(dtype).replace("torch.", "")
    if requested == "fp32" or (requested == "auto" and on_cpu and dtype in (torch.bfloat16,
                                                                            torch.float16)):
        return "fp32"
    return str(dtype).replace("torch.", "")


def _report(progress, done: int, total: int, label: str) -> None:
    if progress is not None:
        progress(done, total, label)
