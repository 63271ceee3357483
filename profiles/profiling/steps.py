"""The steps of `profile_model` after its options are checked (see `profiles.profiling.profiler`).

Ratios, the traced baseline, one sweep point (apply its policy, recognise weights seen before,
evaluate on the compute view), the profile metadata, and writing the directory's files. Every
write goes through `profiles.fileio` (temporary name, then rename).
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from profiles.errors import ProfileError
from profiles.fileio import atomic_write_json
from profiles.profiling import format as fmt
from profiles.profiling.grid import GridSpec, Point
from profiles.profiling.storage import display_url

Progress = Callable[[int, int, str], None]
BASELINE_FILE = "baseline.json"


def report(progress: Progress | None, done: int, total: int, label: str) -> None:
    if progress is not None:
        progress(done, total, label)


def compute_view(loaded, compute: str):
    """The model evaluation runs on: the loaded one, or an fp32 copy of its current weights."""
    if compute != "fp32" or next(loaded.model.parameters()).dtype == torch.float32:
        return loaded
    from profiles.models.expert_map import build_expert_map

    model = copy.deepcopy(loaded.model).float().eval()
    return replace(loaded, model=model, expert_map=build_expert_map(model, loaded.spec))


def ratios_step(out: Path, loaded, spec: GridSpec, req, progress):
    """Measure the ratios DIR does not hold yet and rewrite `ratios.parquet`."""
    import pandas as pd

    from profiles.profiling.ratios import done_key, measure_ratios

    path = out / fmt.RATIOS_FILE
    codecs = [c for c in spec.codecs if c != "noise"]
    extra = [c for c in spec.baselines if c not in codecs]
    done, old = set(), None
    _check_ratios_model(out, loaded.fingerprint)
    if path.exists():
        try:
            old = pd.read_parquet(path)
            done = {done_key(r.layer, r.codec, r.level, getattr(r, "codec_options", None),
                             _matrix_of_row(r)) for r in old.itertuples()}
        except Exception:
            old = None
    sample = req.ratio_sample if req.ratio_sample is not None else 16
    layers = spec.layers if spec.design == "grid" else None
    report = None if progress is None else (lambda d, t, label: progress(d, t, label))
    new = measure_ratios(loaded, codecs + (extra if layers is None else []), spec.mode,
                         spec.levels, sample=sample, seed=req.seed, layers=layers,
                         done_keys=done, progress=report, per_matrix=spec.per_matrix,
                         matrices=spec.matrices)
    if layers is not None:
        # the whole-model baselines (lossless, rtn, --baselines) are policies on every MoE layer:
        # their ratios are needed at every layer, not only at the layers profiled one by one
        done |= {done_key(r.layer, r.codec, r.level, r.codec_options, _matrix_of_row(r))
                 for r in new.itertuples()}
        more = measure_ratios(loaded, extra, spec.mode, spec.levels, sample=sample,
                              seed=req.seed, layers=None, done_keys=done, progress=report)
        new = pd.concat([new, more], ignore_index=True) if len(more) else new
    frame = new if old is None or len(old) == 0 else pd.concat([old, new], ignore_index=True)
    atomic_write_json(out / fmt.RATIOS_MODEL_FILE, {"fingerprint": loaded.fingerprint})
    fmt.write_table(out, fmt.RATIOS_FILE, frame)
    return frame


def _matrix_of_row(row) -> str:
    """A ratio row's matrix kind; rows of profiles made before per-matrix ratios are `all`."""
    m = getattr(row, "matrix", None)
    return m if isinstance(m, str) and m else "all"


def _check_ratios_model(out: Path, fingerprint: str) -> None:
    """Refuse ratios in `out` measured on another model (`ratios.json` names it; a ratio table
    can exist before profile.json does, e.g. after `--ratios-only`)."""
    try:
        theirs = json.loads((out / fmt.RATIOS_MODEL_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record (a profile from before it was kept): as before
    if theirs != fingerprint:
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(theirs, fingerprint, fmt.RATIOS_MODEL_FILE)
        raise ProfileError(f"{out / fmt.RATIOS_FILE} holds ratios of another model "
                           f"({reason or f'fingerprint {theirs}'}); use another --out")


def baseline_and_traces(out: Path, view, evalset: dict, req, progress, spec=None,
                        corpus=None):
    """(baseline EvalResult, traces DataFrame): read back when DIR has them for this evaluation
    set, else recorded now (one greedy pass with router hooks over the built-in tasks, the
    benchmarks and the first prompts of each lm-eval task; with none of them, over the start of
    the text's sequences) and written; lm-eval tasks are scored by lm-eval, apart."""
    from profiles.evaluation import EvalResult
    from profiles.traces import read_traces, write_traces

    names = list(evalset["tasks"]) + ([b.name for b in spec.benches] if spec else []) + \
        ([t.name for t in spec.lm_evals] if spec else [])
    bpath, tpath = out / BASELINE_FILE, out / fmt.TRACES_FILE
    if bpath.exists() and tpath.exists():
        try:
            base = EvalResult.load(bpath)
            if (base.fingerprint, base.split, base.limit, base.seed,
                    [t.task for t in base.tasks]) == (view.fingerprint, evalset["split"],
                                                      evalset["limit"], evalset["seed"], names):
                return base, read_traces(tpath)
        except ProfileError:
            pass
    base, frame = _record_baseline(view, evalset, req, progress, spec, corpus)
    write_traces(frame, tpath)
    base.save(bpath)
    return base, frame

TEXT_TRACE_PROMPTS, TEXT_TRACE_TOKENS = 64, 16


def _record_baseline(view, evalset: dict, req, progress, spec, corpus):
    from profiles.evaluation import EvalResult, TaskResult, proportion
    from profiles.evaluation.evaluate import answer_budget, task_examples
    from profiles.profiling.sensitivity import baseline_from_recording
    from profiles.traces import record_prompt_traces

    split, limit, seed = evalset["split"], evalset["limit"], evalset["seed"]
    builtin = task_examples(evalset["tasks"], split, limit, seed) if evalset["tasks"] else {}
    benches = {b.name: b.examples(limit) for b in (spec.benches if spec else ())}
    sources = [(t, [e.prompt for e in exs], answer_budget(view.tokenizer, exs), ())
               for t, exs in builtin.items()]
    sources += [(b.name, [e.prompt for e in benches[b.name]], b.max_new_tokens, b.stop)
                for b in (spec.benches if spec else ())]
    scored = []   # lm-eval tasks' baselines; their first prompts route the traces
    for t in (spec.lm_evals if spec else ()):
        if progress is not None:
            progress(0, 1, f"baseline: {t.name} (lm-eval)")
        prompts, shown, right = t.answer(view.model, view.tokenizer, limit,
                                         batch_size=req.batch_size)
        scored.append(TaskResult(t.name, len(prompts), proportion(right), proportion(right),
                                 tuple(prompts), tuple(shown), tuple(right), tuple(right)))
        sources.append((t.name, prompts[:TEXT_TRACE_PROMPTS], TEXT_TRACE_TOKENS, ()))
    if not sources:   # text only: route the start of the text's sequences
        seqs = corpus.sequences[:TEXT_TRACE_PROMPTS]
        prompts = [view.tokenizer.decode(list(s[1:33] if len(s) > 1 else s),
                                         skip_special_tokens=True) for s in seqs]
        sources = [("text", [p for p in prompts if p], TEXT_TRACE_TOKENS, ())]
    rec = record_prompt_traces(view, sources, batch_size=req.batch_size,
                               progress=None if progress is None else
                               (lambda d, t, label: progress(d, t, f"baseline and traces: "
                                                                   f"{label}")))
    tasks = []
    if builtin:
        n = sum(len(e) for e in builtin.values())
        sub = replace(rec, prompts=rec.prompts[:n], tasks=rec.tasks[:n],
                      generations=rec.generations[:n])
        tasks += list(baseline_from_recording(view, sub, split, limit, seed).tasks)
    at = sum(len(e) for e in builtin.values())
    for b in (spec.benches if spec else ()):
        exs = benches[b.name]
        gens = rec.generations[at:at + len(exs)]
        at += len(exs)
        marks = [b.score(e, g.text) for e, g in zip(exs, gens)]
        strict, content = [m[0] for m in marks], [m[1] for m in marks]
        tasks.append(TaskResult(b.name, len(exs), proportion(strict), proportion(content),
                                tuple(e.prompt for e in exs), tuple(g.text for g in gens),
                                tuple(strict), tuple(content)))
    tasks += scored
    base = EvalResult(view.spec, view.fingerprint, "base", split, limit, seed, tuple(tasks))
    return base, rec.frame


def layer_digests(loaded, layers) -> dict[int, str]:
    """blake2b of each MoE layer's routed expert bytes (to recognise identical perturbations); for
    a model served from disk, of the storage spec each expert is decoded from (the same spec on
    the same checkpoint gives the same bytes)."""
    out = {}
    if loaded.offload is not None:
        policy = getattr(loaded.offload.reader, "policy", None)
        for layer in layers:
            h = hashlib.blake2b(digest_size=16)
            for e in range(loaded.expert_map.experts_per_layer):
                h.update((policy.expert_specs(layer, e).describe() if policy is not None
                          else "stored").encode() + b"|")
            out[layer] = h.hexdigest()
        return out
    for layer in layers:
        h = hashlib.blake2b(digest_size=16)
        for ref in (r for r in loaded.expert_map.experts if r.layer == layer):
            for name in sorted(ref.tensors):
                t = ref.tensors[name].detach().contiguous()
                h.update(t.view(torch.uint8).numpy().tobytes())
        out[layer] = h.hexdigest()
    return out


def run_point(point: Point, runner, view, loaded, compute: str, sweep, base_digests
               ) -> tuple[float, list[dict]]:
    """Apply the point's policy, recognise weights seen before, evaluate on the compute view."""
    from profiles.policy import apply_policy
    from profiles.profiling.sensitivity import point_policy

    policy, surrogate = point_policy(point, runner.top, loaded.fingerprint)
    with apply_policy(loaded, policy, surrogate=surrogate, seed=runner.seed, measure_bytes=False):
        digests = layer_digests(loaded, point.layers)
        digest = hashlib.blake2b("|".join(f"{k}:{v}" for k, v in sorted(digests.items()))
                                 .encode(), digest_size=16).hexdigest()
        same = same_weights(sweep, digest)
        if same is not None:
            value, rows = same
            rows = [{**r, **point_fields(point), "reused_from": r.get("point_key"),
                     "point_key": point.key, "weights_digest": digest} for r in rows]
            return value, rows
        unchanged = all(digests[x] == base_digests[x] for x in point.layers)
        # the fp32 view is a fresh copy of the weights as perturbed now
        target = compute_view(loaded, compute) if view is not loaded else loaded
        value, rows = runner.evaluate_current(point, target, unchanged=unchanged)
    rows = [{**r, "point_key": point.key, "weights_digest": digest, "reused_from": None,
             "weights_unchanged": unchanged} for r in rows]
    return value, rows


def point_fields(point: Point) -> dict:
    """The identifying columns of a point's sensitivity rows."""
    return {"target": point.target, "target_kind": point.target_kind,
            "layers": ",".join(map(str, point.layers)), "experts": point.experts,
            "codec": point.codec, "mode": point.mode,
            "level": float("nan") if point.level is None else float(point.level),
            "surrogate": point.surrogate,
            "codec_options": json.dumps(dict(point.codec_options), sort_keys=True),
            "matrix": point.matrix}


def same_weights(sweep, digest: str):
    """(value, rows) of a completed, evaluated point whose perturbed weights hash to `digest`."""
    for key, rows in sweep.completed().items():
        if rows and rows[0].get("weights_digest") == digest and not rows[0].get("reused_from"):
            from profiles.profiling.sensitivity import point_value

            return point_value(rows), rows
    return None


def profile_meta(req, loaded, spec: GridSpec, points, tasks, limit, compute, baseline,
                 metrics: dict | None = None) -> dict:
    """The fields of profile.json that do not change while the sweep runs."""
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
        **({"baselines": list(spec.baselines)} if spec.baselines else {}),
        "targets": targets, "experts": spec.experts,
        "groups": {k: list(v) for k, v in spec.groups.items()},
        "design": spec.design, **({"per_matrix": True} if spec.per_matrix else {}),
        **({"matrices": list(spec.matrices)} if spec.per_matrix else {}),
        "compute_dtype": compute, "host_mem_bytes": req.host_mem,
        "catastrophic_drop": req.catastrophic_drop,
        "ratio_sample": req.ratio_sample if req.ratio_sample is not None else 16,
        "storage": display_url(req.storage)   # a password in the URL is not written down
        or f"sqlite:///{(Path(req.out) / fmt.SWEEP_DB).resolve()}",
        "baseline": {t.task: {"strict": t.strict.to_dict(), "content": t.content.to_dict(),
                              "n": t.n} for t in baseline.tasks},
        "points": [p.key for p in points],
        **({"metrics": metrics} if metrics is not None else {}),
    }


def write_outputs(out: Path, meta: dict, completed: dict, keys: Sequence[str], baseline) -> None:
    """Rewrite `sensitivity.parquet` and `profile.json` from every completed point of the grid."""
    import pandas as pd

    from profiles.profiling.sensitivity import detection_limit

    rows = [r for k in keys if k in completed for r in completed[k]]
    frame = fmt.with_matrix_column(pd.DataFrame(rows))
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


def plots_step(out: Path, progress) -> None:
    """Write the ratio curves and the sensitivity heatmaps (content and strict) under plots/."""
    import pandas as pd

    from profiles.profiling.plots import ratio_curves, sensitivity_heatmap

    report(progress, 0, 1, "plots")
    ratios = pd.read_parquet(out / fmt.RATIOS_FILE)
    sens = pd.read_parquet(out / fmt.SENSITIVITY_FILE)
    ratio_curves(ratios, out / fmt.PLOTS_DIR / "ratios.png")
    sensitivity_heatmap(sens, out / fmt.PLOTS_DIR / "sensitivity_content.png", "content")
    sensitivity_heatmap(sens, out / fmt.PLOTS_DIR / "sensitivity_strict.png", "strict")
    report(progress, 1, 1, "plots")
