"""Validate a plan for real: apply its policy with real codec round trips, measure accuracy on the
held-out `validate` split, and compare with what the plan predicted.

The plan's accuracy prediction comes from the profile's `profile` split; the `validate` split is
disjoint in its operands and read only here, so the comparison is out of sample. Steps:

1. read the plan, load its model and refuse it when the model's fingerprint differs;
2. evaluate the unperturbed model once (cached on disk by `profiles.evaluation.cached_baseline`);
3. apply the policy (`profiles.policy.apply_policy`: every routed expert encoded and decoded by its
   codec) and evaluate the same prompts, paired: per task the change of strict and content
   accuracy with Newcombe's paired interval and the exact McNemar p;
4. average the plan's metric over tasks (MOVER interval, `planner.verdict`), and give the verdict
   `held` / `violated` / `inconclusive` against the plan's budget.

The plan carries its profile's evaluation set (`evaluation`: built-in tasks, user benchmarks,
lm-eval tasks and the text corpus, each split by a stable hash into the profile and validate
halves), and validation measures the other half of each. For a plan whose metric is `kl` the
drop is the mean KL(base || plan) in nats per token on the text's validate half (the built-in
tasks' validate prompts and answers without a text); for `ppl` the perplexity ratio minus 1; both
with bootstrap intervals over sequences (`profiles.evaluation.textmetrics`). For a task's name,
the drop is that task's content accuracy drop (for an lm-eval task, the drop of its per-document
primary metric).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from planner.verdict import TaskChange, decide, mean_change, negate
from profiles.errors import ModelError, MoeszError, PlanError
from profiles.evaluation.accuracy import Interval
from profiles.evaluation.paired import mcnemar_exact_p
from profiles.evaluation.threads import torch_threads

KIND, SCHEMA_VERSION = "validation", 1
METRICS = ("content", "strict", "kl", "ppl")
DEFAULT_LIMIT = 300  # prompts per task; the profiler's default too
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PlanFacts:
    """What validation needs from a plan file."""

    path: Path
    doc: dict
    policy: object          # profiles.policy.Policy
    model_spec: str
    fingerprint: str | None
    metric: str
    budget: float
    predicted_drop: Interval | None


def read_plan(path: str | Path, model: str | None = None) -> PlanFacts:
    """Read the plan file's policy, model, budget and predicted drop (`planner.plan.load_plan`).

    Args:
        path: a plan file (`moesz plan --out`).
        model: the model to validate on instead of the plan's own (its fingerprint must match).

    Raises:
        PlanError: the file is missing, not a plan, or names no model.
    """
    from planner.plan import load_plan

    plan = load_plan(Path(path).expanduser())
    doc = plan.doc
    spec = model or doc["model"].get("spec")
    if not spec:
        raise PlanError(f"{plan.path}: field 'model.spec' is empty, so the model to load is "
                        f"unknown; pass --model")
    budget = doc["budget"]
    metric, value = budget.get("metric", "content"), budget.get("value")
    tasks = list((doc.get("evaluation") or {}).get("tasks") or [])
    if metric not in METRICS + tuple(tasks) or not isinstance(value, (int, float)) or value < 0:
        raise PlanError(f"{plan.path}: field 'budget' is {budget!r}; expected {{metric: "
                        f"{'|'.join(METRICS + tuple(tasks))}, value: a non-negative number}}")
    pred = doc["predicted"]["accuracy_drop"]
    method = " ".join(str(pred[k]) for k in ("kind", "interval") if pred.get(k)) or \
        "predicted (additive accuracy model)"
    return PlanFacts(plan.path, doc, plan.policy, spec, plan.fingerprint, metric, float(value),
                     Interval(float(pred["value"]), float(pred["low"]), float(pred["high"]),
                              str(pred.get("method", method))))


def validate_plan(plan: str | Path, *, split: str = "validate", limit: int | None = None,
                  tasks: Sequence[str] | None = None, model: str | None = None,
                  cache_dir: str | Path | None = None, batch_size: int = 64,
                  threads: int | None = 1, progress: Progress | None = None,
                  host_mem: int | None = None, offload: bool = False,
                  text: str | None = None, bench: Sequence[str] = (),
                  lm_eval: str | None = None) -> dict:
    """Measure a plan's accuracy for real and judge it against its budget.

    Args:
        plan: the plan file.
        split: the evaluation split (`validate`, held out from profiling and planning).
        limit: prompts per task (default: as many as the plan's profile used, else
            `DEFAULT_LIMIT`: fewer prompts cannot resolve changes as small as the profile could).
        tasks: built-in tasks (default: all).
        model: evaluate this model instead of the plan's (must have the plan's fingerprint).
        cache_dir: where the unperturbed model's result is cached (default ~/.cache/moesz).
        batch_size: prompts per forward pass.
        threads: torch intra-op threads while evaluating (None: leave torch's setting).
        progress: `progress(done, total, label)`.
        host_mem, offload: evaluate with the routed experts on disk, at most `host_mem` bytes of
            them in host memory (`profiles.models.offload`), for models larger than RAM; the
            arithmetic is then the model's own dtype.
        text: measure the text metrics on this file's validate half instead of the plan's text.
        bench: measure these JSONL benchmarks' validate halves instead of the plan's (read with
            the plan's first benchmark's template and pattern, else the defaults).
        lm_eval: measure these lm-eval tasks' validate halves (`TASK[,TASK]`) instead of the
            plan's.

    Returns:
        The validation document (kind `validation`): `measured`, `predicted`, `budget`,
        `verdict`, `verdict_detail`, per-task figures and timings.

    Raises:
        PlanError: the plan cannot be read or was made for another model fingerprint.
    """
    from profiles.evaluation import cached_baseline, evaluate
    from profiles.evaluation.textmetrics import builtin_corpus, text_metrics, text_reference
    from profiles.models import load_model
    from profiles.policy import apply_policy

    facts = read_plan(plan, model)
    spec = _plan_spec(facts, tasks, text, bench, split, lm_eval)
    limit = limit if limit is not None else _profile_limit(facts)
    if limit < 1:
        raise PlanError(f"--limit {limit} must be at least 1 prompt per task")
    t0 = time.perf_counter()
    with torch_threads(threads):
        try:
            loaded = load_model(facts.model_spec, host_mem=host_mem,
                                offload=offload or host_mem is not None)
        except ModelError as exc:
            raise PlanError(f"{facts.path}: its model {facts.model_spec!r} cannot be loaded "
                            f"({exc}); pass --model") from None
        if facts.fingerprint and loaded.fingerprint != facts.fingerprint:
            raise PlanError(f"{facts.path} was made for model fingerprint {facts.fingerprint}, but "
                            f"{facts.model_spec} has {loaded.fingerprint}; make a plan for this "
                            f"model (moesz profile model, then moesz plan)")
        wide = _wants_fp32(loaded) and loaded.offload is None
        cache = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "moesz"
        name = loaded.fingerprint.replace(":", "_")
        base_file = cache / f"baseline-{name}-{split}-{limit}{'-fp32' if wide else ''}.json"
        stage = _Stages(progress)
        view = _view(loaded, wide)
        kw = dict(split=split, limit=limit, batch_size=batch_size)
        if spec.tasks and not (spec.benches or spec.lm_evals):
            base = cached_baseline(view, base_file, list(spec.tasks), progress=stage("baseline"),
                                   **kw)
        elif spec.benches or spec.lm_evals:
            base = evaluate(view, tasks=list(spec.tasks), benchmarks=spec.benches,
                            lm_evals=spec.lm_evals, progress=stage("baseline"), **kw)
        else:
            base = None
        corpus = None
        if spec.text is not None:
            try:
                corpus = spec.corpus(view, split if split in ("profile", "validate")
                                     else "validate")
            except MoeszError as exc:
                raise PlanError(f"{facts.path}: its text corpus cannot be read ({exc})") from None
        elif facts.metric in ("kl", "ppl"):
            corpus = builtin_corpus(view.tokenizer, split, per_task=max(4, min(limit, 32)),
                                    model=view.model)
        ref = text_reference(view.model, corpus) if corpus is not None else None
        del view
        t1 = time.perf_counter()
        with apply_policy(loaded, facts.policy, progress=stage("apply policy")) as report:
            t2 = time.perf_counter()
            view = _view(loaded, wide)  # the decoded (bf16) weights, wider arithmetic only
            result = None if base is None else evaluate(
                view, tasks=[t.task for t in base.tasks if t.task in spec.tasks],
                benchmarks=spec.benches, lm_evals=spec.lm_evals, baseline=base, condition="plan",
                progress=stage("plan"), **kw)
            text = text_metrics(view.model, ref) if ref is not None else None
        t3 = time.perf_counter()
    doc = _document(facts, loaded, split, limit, base, result, report, text)
    doc["compute"] = ("fp32 arithmetic on the checkpoint's (decoded) bf16 weights, on the CPU"
                      if wide else f"the model's own dtype on {next(loaded.model.parameters()).device}")
    doc["timings_s"] = {"load_and_baseline": t1 - t0, "apply_policy": t2 - t1,
                        "evaluate_plan": t3 - t2, "source": "measured (wall clock)"}
    if loaded.offload is not None:
        from profiles.models.offload import offload_summary

        doc["experts_from_disk"] = offload_summary(loaded)
    return doc


def _plan_spec(facts: PlanFacts, tasks: Sequence[str] | None, text: str | None = None,
               bench: Sequence[str] = (), split: str = "validate", lm_eval: str | None = None):
    """The evaluation set to measure: the plan's profile's (validate halves), or the built-in
    tasks for plans made before profiles recorded it; `tasks` narrows the built-in tasks, `text`,
    `bench` and `lm_eval` replace the plan's text, benchmarks and lm-eval tasks.

    Raises:
        PlanError: a replacement file that cannot be read, or one that drops the plan's metric.
        ConfigError: the plan's lm-eval tasks cannot be loaded (lm-eval missing, data gone).
    """
    from profiles.profiling.metrics import EvalSpec, eval_spec, spec_from_record
    from profiles.tasks import check_task_names

    record = facts.doc.get("evaluation")
    spec = spec_from_record(record) if isinstance(record, dict) else \
        EvalSpec(tuple(check_task_names(None)), (), None)
    if tasks:
        spec = replace(spec, tasks=tuple(check_task_names(list(tasks))))
    if text is not None or bench or lm_eval:
        first = spec.benches[0] if spec.benches else None
        try:
            given = eval_spec(None, tuple(bench), first.template if first else None,
                              first.extract if first else None,
                              first.max_new_tokens if first else 256, text, lm_eval=lm_eval,
                              split="validate")
        except MoeszError as exc:
            raise PlanError(str(exc)) from None
        recorded = {str(r.get("name")): r for r in (record or {}).get("lm_eval", [])
                    if isinstance(r, dict)} if isinstance(record, dict) else {}
        for t in given.lm_evals:   # another version of a task the plan was made on
            r = recorded.get(t.name)
            if r is None:
                continue
            now = t.to_dict()
            differ = [k for k in ("docs_sha256", "prompts_sha256", "metric", "num_fewshot")
                      if r.get(k) and r.get(k) != now.get(k)]
            if differ:
                raise PlanError(f"--lm-eval {t.source}: task {t.name!r} differs from the one the "
                                f"plan was made on ({', '.join(differ)}); validate on the "
                                f"plan's own task (omit --lm-eval) or profile again")
        spec = replace(spec, text=given.text if text is not None else spec.text,
                       benches=given.benches if bench else spec.benches,
                       lm_evals=given.lm_evals if lm_eval else spec.lm_evals)
        names = set(spec.task_names())
        if facts.metric not in METRICS and facts.metric not in names:
            raise PlanError(f"{facts.path}: its budget is on {facts.metric!r}, which the given "
                            f"--bench files and --lm-eval tasks do not include "
                            f"({', '.join(sorted(names))}); give that task too")
    # benchmarks and texts have two halves; the built-in tasks' `train` split has no counterpart
    return spec.with_split(split if split in ("profile", "validate") else "validate")


def _profile_limit(facts: PlanFacts) -> int:
    """Prompts per task of the profile the plan was made from (if it can be read)."""
    prof = Path(str(facts.doc["model"].get("profile") or "")) / "profile.json"
    try:
        n = int(json.loads(prof.read_text())["prompts_per_task"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_LIMIT
    return n if n >= 1 else DEFAULT_LIMIT


def _wants_fp32(loaded) -> bool:
    """On the CPU, bf16/fp16 matrix products are several times slower than fp32 ones, so the
    evaluation runs on an fp32 copy: the weights keep their checkpoint (or decoded) values, only the
    arithmetic is wider — as `profiles.profiling` does for the profile the plan was made from."""
    p = next(loaded.model.parameters())
    return p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


def _view(loaded, wide: bool):
    if not wide:
        return loaded
    return replace(loaded, model=copy.deepcopy(loaded.model).float().eval())


class _Stages:
    """Turn one progress callback into per-stage callbacks with their stage name in the label."""

    def __init__(self, progress: Progress | None):
        self.progress = progress

    def __call__(self, name: str) -> Progress | None:
        if self.progress is None:
            return None
        return lambda done, total, label: self.progress(done, total, f"{name}: {label}")


def _document(facts: PlanFacts, loaded, split, limit, base, result, report, text) -> dict:
    tasks, changes = {}, {"strict": [], "content": []}
    pooled = {"strict": [0, 0], "content": [0, 0]}
    for b, r in zip(base.tasks if base else (), result.tasks if result else ()):
        tasks[r.task] = {"n": r.n, "base": {"strict": b.strict.to_dict(),
                                            "content": b.content.to_dict()},
                         "plan": {"strict": r.strict.to_dict(), "content": r.content.to_dict()}}
        for metric in ("strict", "content"):
            pc = getattr(r, f"{metric}_change")
            tasks[r.task][f"{metric}_change"] = pc.change.to_dict()
            tasks[r.task][f"{metric}_mcnemar_p"] = pc.mcnemar_p
            tasks[r.task][f"{metric}_discordant"] = {"gained": pc.gained, "lost": pc.lost}
            changes[metric].append(TaskChange(r.task, r.n, pc.change))
            pooled[metric][0] += pc.gained
            pooled[metric][1] += pc.lost
    drops = {m: negate(mean_change(changes[m])) for m in ("strict", "content") if changes[m]}
    pvalue = None
    if facts.metric == "kl":
        drop, per_task = text.kl_nats, ()
    elif facts.metric == "ppl":
        r = text.ppl_ratio
        drop, per_task = Interval(r.value - 1, r.low - 1, r.high - 1,
                                  f"perplexity ratio - 1, {r.method}"), ()
    elif facts.metric in ("content", "strict"):
        drop, per_task = drops[facts.metric], changes[facts.metric]
        pvalue = mcnemar_exact_p(*pooled[facts.metric])
    else:   # one task's content accuracy
        per_task = [c for c in changes["content"] if c.task == facts.metric]
        drop = negate(mean_change(per_task))
        pvalue = tasks[facts.metric]["content_mcnemar_p"]
    verdict = decide(drop, facts.budget, per_task)
    n_prompts = sum(t["n"] for t in tasks.values())
    measured = {
        "source": "measured", "metric": facts.metric, "accuracy_drop": drop.to_dict(),
        "strict_drop": drops["strict"].to_dict() if "strict" in drops else None,
        "content_drop": drops["content"].to_dict() if "content" in drops else None,
        "mcnemar_p": pvalue,
        "mcnemar_p_method": "exact McNemar on the discordant prompts pooled over tasks",
        "interval_method": drop.method,
        "kl_nats": text.kl_nats.to_dict() if text else None,
        "text": text.to_dict() if text else None,
        "tasks": tasks, "stored_bytes": report.stored_bytes,
        "original_bytes": report.original_bytes, "ratio": report.ratio,
        "bytes_method": "real encodes of every routed expert (headers counted)"}
    pred = facts.doc.get("predicted") or {}
    predicted = {"source": "predicted (from the plan file)", "metric": facts.metric,
                 "accuracy_drop": facts.predicted_drop.to_dict() if facts.predicted_drop else None,
                 "tokens_per_s": pred.get("tokens_per_s"),
                 "tokens_per_s_kind": pred.get("tokens_per_s_kind"),
                 "host_mem_bytes": pred.get("host_bytes")}
    return {"kind": KIND, "schema_version": SCHEMA_VERSION, "plan": str(facts.path),
            "model": {"spec": facts.model_spec, "fingerprint": loaded.fingerprint},
            "split": split, "limit": limit, "n_prompts": n_prompts, "tasks": list(tasks),
            "metric": facts.metric, "budget": facts.doc.get("budget"),
            "measured": measured, "predicted": predicted, "verdict": verdict.verdict,
            "verdict_detail": verdict.to_dict()}
