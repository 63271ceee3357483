"""Evaluate one sweep point: perturb the targeted experts, measure the paired accuracy change.

For a `Point`, the targeted experts go through the point's storage (a real codec round trip, or
the study's noise surrogate at the same bound) with `profiles.policy.apply_policy`; the model then
answers the same prompts as the unperturbed baseline (`profiles.evaluation`), and each task gets
its strict and content accuracy change with Newcombe's paired interval and the exact McNemar
p-value, plus the label-free KL(base || perturbed), top-1 agreement and perplexity ratio on a text
corpus (`profiles.evaluation.textmetrics`: the `--text` file's profile half, else the built-in
tasks' prompts and answers), with bootstrap intervals over sequences. Tasks are the built-in ones,
user JSONL benchmarks and lm-eval tasks (scored per document by lm-eval) alike; a profile with a
text and no task gets one row per point (task `(text)`) holding the text metrics only.

Cost control: the prompts are answered in two stages; after the first quarter (at least 16 per
task) a point whose content accuracy, averaged over tasks, has fallen by more than
`catastrophic_drop` with confidence (the upper end of the combined paired interval below it) is
stopped early and recorded with `stopped_early` and the prompts actually run.

The detection limit of a profile is the half-width of the paired interval of the mean change over
tasks; the per-task Newcombe half-widths h_t are combined as sqrt(sum h_t^2) / T (the tasks' prompts
are independent). `typical_half_width` takes the median over the measured points; `floor_half_width`
is the smallest it can be at this n (no discordant prompt at all).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from profiles.policy import Policy, StorageSpec
from profiles.profiling.grid import Point
from profiles.profiling.metrics import TEXT_ROW

Progress = Callable[[int, int, str], None]
INTERVAL_METHOD = "newcombe-paired"
DETECTION_METHOD = ("median over points of the 95% paired interval half-width of the mean change "
                    "over tasks: sqrt(sum of per-task Newcombe half-widths^2) / tasks")


def top_experts(traces, moe_layers: Sequence[int], experts_per_layer: int) -> dict[int, list[int]]:
    """Per MoE layer, expert indices by activation count in the traces, most activated first
    (ties by index)."""
    counts = {layer: [0] * experts_per_layer for layer in moe_layers}
    if traces is not None and len(traces):
        grouped = traces.groupby(["layer", "expert"]).size()
        for (layer, expert), n in grouped.items():
            if layer in counts and 0 <= expert < experts_per_layer:
                counts[layer][expert] = int(n)
    return {layer: sorted(range(experts_per_layer), key=lambda e: (-c[e], e))
            for layer, c in counts.items()}


def point_policy(point: Point, top: Mapping[int, Sequence[int]],
                 fingerprint: str | None) -> tuple[Policy, str | None]:
    """The policy that perturbs exactly the point's experts (every other expert raw)."""
    codec = (point.spec_codec or "szp") if point.surrogate != "none" else point.codec
    mode = None if point.mode == "none" else point.mode
    spec = StorageSpec(codec, mode, point.level, dict(point.codec_options))
    layers, experts, matrices = {}, {}, {}
    kind, _, arg = point.experts.partition(":")
    matrix = getattr(point, "matrix", "all")
    for layer in point.layers:
        keys = [(layer, None)] if kind == "all" else [
            (layer, e) for e in (list(top[layer])[:int(arg)] if kind == "top" else [int(arg)])]
        for lay, e in keys:
            if matrix != "all":   # only this matrix; the expert's others stay raw
                matrices[(lay, e, matrix)] = spec
            elif e is None:
                layers[lay] = spec
            else:
                experts[(lay, e)] = spec
    surrogate = None if point.surrogate == "none" else point.surrogate
    return Policy(fingerprint=fingerprint, layers=layers, experts=experts,
                  matrices=matrices), surrogate


def mean_change_interval(changes: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(mean, low, high) of per-task (change, low, high), half-widths combined in quadrature."""
    t = len(changes)
    if t == 0:
        return math.nan, math.nan, math.nan
    mean = sum(c for c, _, _ in changes) / t
    down = math.sqrt(sum((c - lo) ** 2 for c, lo, _ in changes)) / t
    up = math.sqrt(sum((hi - c) ** 2 for c, _, hi in changes)) / t
    return mean, mean - down, mean + up


def half_width(rows: Sequence[dict], metric: str = "content") -> float | None:
    """Half-width of the mean-over-tasks interval of one point's rows (None if early-stopped)."""
    rows = [r for r in rows if r.get("task") != TEXT_ROW]
    if not rows or any(r.get("stopped_early") for r in rows):
        return None
    _, lo, hi = mean_change_interval([(r[f"{metric}_change"], r[f"{metric}_change_low"],
                                       r[f"{metric}_change_high"]) for r in rows])
    return (hi - lo) / 2


def floor_half_width(baseline, metric: str = "content") -> float:
    """The detection limit with no discordant prompt: each task's Newcombe interval of a table
    with zero gained and lost, combined over tasks."""
    from profiles.evaluation import newcombe_paired_interval

    parts = []
    for t in baseline.tasks:
        right = sum(getattr(t, f"{metric}_correct"))
        iv = newcombe_paired_interval(right, 0, 0, t.n - right)
        parts.append((iv.value, iv.low, iv.high))
    _, lo, hi = mean_change_interval(parts)
    return (hi - lo) / 2


def detection_limit(baseline, point_rows: Sequence[Sequence[dict]], metric: str = "content") -> dict:
    """The profile's `detection_limit` record (docs/model-profile.md)."""
    if not baseline.tasks:
        return {"metric": None, "half_width": 0.0, "floor_half_width": 0.0,
                "points_measured": 0, "prompts_per_task": 0, "tasks": 0,
                "method": "no accuracy task in this profile (text metrics only)"}
    widths = [w for rows in point_rows if (w := half_width(rows, metric)) is not None]
    floor = floor_half_width(baseline, metric)
    typical = statistics.median(widths) if widths else floor
    return {"metric": metric, "half_width": typical, "floor_half_width": floor,
            "points_measured": len(widths), "prompts_per_task": baseline.tasks[0].n,
            "tasks": len(baseline.tasks),
            "method": DETECTION_METHOD if widths else
            "no point measured yet: the floor (no discordant prompt), " + DETECTION_METHOD}


def budget_warning(limit: Mapping, budget: float, metric: str = "content") -> str | None:
    """A warning when an accuracy budget is below what the profile can detect, else None."""
    if limit.get("metric") != metric:
        return None
    hw = float(limit["half_width"])
    if budget < hw:
        return (f"the accuracy budget {budget:g} is below the profile's detection limit "
                f"±{hw:.4f} ({metric}, mean over tasks, {limit.get('prompts_per_task')} prompts "
                f"per task): changes that small cannot be told from zero; profile with a larger "
                f"--limit or use a larger budget")
    return None


@dataclass
class SensitivityRunner:
    """Evaluates points against one cached baseline.

    Args:
        loaded: the `LoadedModel`.
        baseline: the unperturbed `EvalResult` on the sweep's prompts.
        base_fidelity: `TextReference` of the unperturbed model on the text corpus.
        top: per-layer experts by activation (for `top:N` targets).
        benches: user benchmarks among the baseline's tasks, by task name.
        lm_evals: lm-eval tasks among the baseline's tasks (`profiles.evaluation.lmeval`), by
            task name.
        seed: surrogate noise seed.
        batch_size: prompts per forward pass.
        catastrophic_drop: stop a point early when its mean content change is surely below minus
            this (None: never).
    """

    loaded: object
    baseline: object
    base_fidelity: object
    top: Mapping[int, Sequence[int]]
    seed: int = 0
    batch_size: int = 128
    catastrophic_drop: float | None = 0.5
    progress: Progress | None = None
    benches: Mapping[str, object] = None
    lm_evals: Mapping[str, object] = None

    def __post_init__(self) -> None:
        self.benches = dict(self.benches or {})
        self.lm_evals = dict(self.lm_evals or {})

    def run(self, point: Point) -> tuple[float, list[dict]]:
        """Apply the point's policy to `loaded`, evaluate it, restore; (mean content change,
        one row per task)."""
        from profiles.policy import apply_policy

        policy, surrogate = point_policy(point, self.top, self.loaded.fingerprint)
        with apply_policy(self.loaded, policy, surrogate=surrogate, seed=self.seed,
                          measure_bytes=False):
            return self.evaluate_current(point, self.loaded)

    def evaluate_current(self, point: Point, target, unchanged: bool = False
                         ) -> tuple[float, list[dict]]:
        """Evaluate `target` (a LoadedModel-like with `.model` and `.tokenizer`) as it is now,
        i.e. with the point's perturbation already applied.

        Args:
            point: the point being evaluated (for labels and rows).
            target: the model to run.
            unchanged: the perturbation left every weight bit-identical (a lossless codec); the
                greedy answers are then the baseline's own and are not generated again.
        """
        from profiles.evaluation.textmetrics import text_metrics

        n = max((t.n for t in self.baseline.tasks), default=0)
        if unchanged or n == 0:
            results = {t.task: (list(t.prompts), list(t.generations), list(t.strict_correct),
                                list(t.content_correct)) for t in self.baseline.tasks}
            stopped = False
        else:
            first = n if self.catastrophic_drop is None else min(n, max(16, n // 4))
            results = self._answer(target, 0, first, point)
            stopped = first < n and self._catastrophic(results)
            if not stopped and first < n:
                more = self._answer(target, first, n, point)
                results = {t: _concat(results[t], more[t]) for t in results}
        fid = text_metrics(target.model, self.base_fidelity)
        if not self.baseline.tasks:
            row = self._text_row(point, fid)
            return point_value([row]), [row]
        rows = [self._row(point, results[t.task], t, fid, stopped) for t in self.baseline.tasks]
        return point_value(rows), rows

    def _answer(self, target, start: int, stop: int, point: Point) -> dict:
        """Per task (prompts, generations, strict, content) for prompts [start, stop)."""
        from profiles.evaluation import greedy_generate
        from profiles.evaluation.evaluate import answer_budget
        from profiles.tasks import generate, score

        out = {}
        for t in self.baseline.tasks:
            bench = self.benches.get(t.task)
            lm = self.lm_evals.get(t.task)
            if lm is not None:   # lm-eval scores the documents itself
                prompts, shown, right = lm.answer(target.model, target.tokenizer,
                                                  self.baseline.limit, start, stop,
                                                  self.batch_size)
                out[t.task] = (prompts, shown, right, list(right))
                continue
            if bench is not None:
                exs = bench.examples(self.baseline.limit)[start:stop]
                budget, stop_at, scorer = bench.max_new_tokens, bench.stop, bench.score
            else:
                exs = generate(t.task, self.baseline.split, self.baseline.limit,
                               self.baseline.seed)[start:stop]
                budget, stop_at, scorer = answer_budget(target.tokenizer, exs), (), score
            gens = greedy_generate(target.model, target.tokenizer,
                                   [e.prompt for e in exs], budget, self.batch_size,
                                   label=f"{point.describe()}: {t.task}", stop=stop_at)
            marks = [scorer(e, g.text) for e, g in zip(exs, gens)]
            out[t.task] = ([e.prompt for e in exs], [g.text for g in gens],
                           [m[0] for m in marks], [m[1] for m in marks])
        return out

    def _catastrophic(self, results: dict) -> bool:
        from profiles.evaluation import compare_paired

        parts = []
        for t in self.baseline.tasks:
            k = len(results[t.task][3])
            c = compare_paired(t.content_correct[:k], results[t.task][3], "content").change
            parts.append((c.value, c.low, c.high))
        _, _, high = mean_change_interval(parts)
        return high < -float(self.catastrophic_drop)

    def _row(self, point: Point, res, base, fid, stopped: bool) -> dict:
        from profiles.evaluation import compare_paired, proportion

        prompts, _, strict, content = res
        k = len(prompts)
        if tuple(prompts) != base.prompts[:k]:
            raise RuntimeError(f"task {base.task}: prompts differ from the baseline's")
        sc = compare_paired(base.strict_correct[:k], strict, "strict")
        cc = compare_paired(base.content_correct[:k], content, "content")
        return {
            "target": point.target, "target_kind": point.target_kind,
            "layers": ",".join(map(str, point.layers)), "experts": point.experts,
            "codec": point.codec, "mode": point.mode,
            "level": math.nan if point.level is None else float(point.level),
            "surrogate": point.surrogate, "task": base.task, "n": k,
            "strict_base": proportion(base.strict_correct[:k]).value,
            "strict": proportion(strict).value,
            "content_base": proportion(base.content_correct[:k]).value,
            "content": proportion(content).value,
            "strict_change": sc.change.value, "strict_change_low": sc.change.low,
            "strict_change_high": sc.change.high,
            "content_change": cc.change.value, "content_change_low": cc.change.low,
            "content_change_high": cc.change.high,
            "strict_mcnemar_p": sc.mcnemar_p, "content_mcnemar_p": cc.mcnemar_p,
            "interval_method": INTERVAL_METHOD, **text_columns(fid),
            "stopped_early": bool(stopped),
            "content_gained": cc.gained, "content_lost": cc.lost,
            "strict_gained": sc.gained, "strict_lost": sc.lost,
            "codec_options": _opts_json(point), "matrix": getattr(point, "matrix", "all")}

    def _text_row(self, point: Point, fid) -> dict:
        nan = math.nan
        return {
            "target": point.target, "target_kind": point.target_kind,
            "layers": ",".join(map(str, point.layers)), "experts": point.experts,
            "codec": point.codec, "mode": point.mode,
            "level": nan if point.level is None else float(point.level),
            "surrogate": point.surrogate, "task": TEXT_ROW, "n": fid.sequences,
            **{c: nan for c in ("strict_base", "strict", "content_base", "content",
                                "strict_change", "strict_change_low", "strict_change_high",
                                "content_change", "content_change_low", "content_change_high",
                                "strict_mcnemar_p", "content_mcnemar_p")},
            "interval_method": INTERVAL_METHOD, **text_columns(fid), "stopped_early": False,
            "content_gained": 0, "content_lost": 0, "strict_gained": 0, "strict_lost": 0,
            "codec_options": _opts_json(point), "matrix": getattr(point, "matrix", "all")}


def point_value(rows: Sequence[dict]) -> float:
    """A point's value in the sweep: its mean content change over tasks, or (a text-only
    profile) minus its KL."""
    tasks = [r for r in rows if r.get("task") != TEXT_ROW]
    if tasks:
        return sum(r["content_change"] for r in tasks) / len(tasks)
    return -float(rows[0]["kl_nats"]) if rows else 0.0


def text_columns(fid) -> dict:
    """The text-metric columns of a sensitivity row (docs/model-profile.md)."""
    return {"kl_nats": fid.kl_nats.value, "kl_low": fid.kl_nats.low, "kl_high": fid.kl_nats.high,
            "top1_agreement": fid.top1_agreement.value, "ppl_ratio": fid.ppl_ratio.value,
            "ppl_ratio_low": fid.ppl_ratio.low, "ppl_ratio_high": fid.ppl_ratio.high,
            "text_tokens": fid.tokens}


def _concat(a, b):
    return tuple(list(x) + list(y) for x, y in zip(a, b))


def _opts_json(point: Point) -> str:
    import json

    return json.dumps(dict(point.codec_options), sort_keys=True)


def baseline_from_recording(loaded, recording, split: str, limit: int, seed: int):
    """The unperturbed `EvalResult` built from a trace recording's generations (the same greedy
    generations `evaluate` would produce on these prompts), so the baseline costs nothing extra."""
    from profiles.evaluation import EvalResult, TaskResult, proportion
    from profiles.tasks import generate, score

    by_task: dict[str, list] = {}
    for prompt, task, gen in zip(recording.prompts, recording.tasks, recording.generations):
        by_task.setdefault(task, []).append((prompt, gen.text))
    tasks = []
    for task, items in by_task.items():
        exs = generate(task, split, limit, seed)
        if [e.prompt for e in exs] != [p for p, _ in items]:
            raise RuntimeError(f"trace prompts of task {task} differ from the evaluation's")
        marks = [score(e, text) for e, (_, text) in zip(exs, items)]
        strict, content = [m[0] for m in marks], [m[1] for m in marks]
        tasks.append(TaskResult(task, len(exs), proportion(strict), proportion(content),
                                tuple(p for p, _ in items), tuple(t for _, t in items),
                                tuple(strict), tuple(content)))
    return EvalResult(loaded.spec, loaded.fingerprint, "base", split, limit, seed, tuple(tasks))


__all__ = ["SensitivityRunner", "baseline_from_recording", "budget_warning", "detection_limit",
           "floor_half_width", "half_width", "mean_change_interval", "point_policy", "top_experts"]
