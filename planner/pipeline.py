"""Making a plan: the one library call behind `moesz plan`.

Steps: read the model profile and the hardware profile; build the accuracy model and the
closed-form cost model; tabulate every (layer, choice); solve the exact knapsack (`planner.milp`);
run the Optuna study from a cold start and measure its gap to the MILP optimum; warm-start it with
the MILP optimum and the baselines (`enqueue_trial`); re-rank the best candidates with the
discrete-event simulator; compute the baselines; write the plan file.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from planner.accuracy import AccuracyModel
from planner.baselines import BEST_USER_FORMAT, Baseline, compute_baselines
from planner.budget import (METRIC_UNITS, binding, budget_value, check_budget, make_budget,
                            predicted_drop, resolve_metric)
from planner.choices import ChoiceTable, build_table, default_codecs
from planner.milp import MilpResult, solve_knapsack
from planner.modelprofile import ModelProfile, load_profile
from planner.plan import Plan, hardware_source, plan_from_dict, save_plan
from planner.plan_document import from_baseline, from_candidate, plan_document, progress_iter
from planner.search import PlanSearch, SearchResult, resolve_space, run_search
from profiles.errors import ConfigError, PlanError
from profiles.serving import ServingConfig

Progress = Callable[[int, int, str], None]
DEFAULT_VERIFY = 3   # candidates `moesz plan` measures on a measured profile unless told otherwise


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for.

    Attributes:
        profile: model profile directory.
        hardware: hardware profile file or `preset:NAME`.
        budget: largest allowed drop of `metric` (fraction; nats for kl), averaged over tasks.
        serving: the serving configuration.
        metric: `content`, `strict` or `kl`.
        codecs: codecs to consider (None: the defaults for the configuration).
        trials: Optuna trials of the cold-start phase.
        warm_trials: further trials after enqueuing the MILP optimum and the baselines.
        storage: Optuna storage URL (None: in memory).
        seed: sampler seed.
        sampler: `tpe` or `nsga2`.
        space: `auto`, `lagrangian` or `per-layer` (see `planner.search`).
        z: one-sided normal quantile of the accuracy bound (1.645 = 95 %).
        rerank: candidates re-ranked by the simulator (0: none).
        simulate_baselines: also simulate the baselines (slower).
        cache_allocation: also search the per-layer cache allocation.
        placement_traces: rank static placements by this trace file instead of the profile's
            traces (which are an oracle for the workload they describe).
        command: the command line, recorded in the plan.
        verify: measure this many candidates for real on the profile split (`planner.verify`)
            and plan the fastest whose measured bound meets the budget; None: DEFAULT_VERIFY
            on a measured profile, 0 on a synthetic one (it has no model to measure).
        per_matrix: plan a level per (layer, matrix): gate_up and down each get a spec
            (`planner.choices.MatrixChoice`); needs a profile made with `--per-matrix`.
        more_budgets: further (metric, value) budgets every plan must also meet: the search
            runs on the first, the others are checked on its candidates (predicted, or
            measured when verified); the plan says which budget binds.
    """

    profile: str
    hardware: str
    budget: float
    serving: ServingConfig
    metric: str = "content"
    codecs: tuple[str, ...] | None = None
    trials: int = 300
    warm_trials: int = 20
    storage: str | None = None
    seed: int = 0
    sampler: str = "tpe"
    space: str = "auto"
    z: float = 1.6448536269514722
    rerank: int = 3
    simulate_baselines: bool = False
    cache_allocation: bool = False
    placement_traces: str | None = None
    command: str = ""
    verify: int | None = 0
    more_budgets: tuple[tuple[str, Any], ...] = ()
    per_matrix: bool = False


@dataclass(frozen=True)
class PlanOutcome:
    """The plan and what was computed on the way (for plots and benchmarks)."""

    plan: Plan
    table: ChoiceTable
    milp: MilpResult
    cold: SearchResult
    final: SearchResult
    baselines: list[Baseline]
    accuracy: AccuracyModel
    closed_form: Any
    profile: ModelProfile
    study: Any = None
    timings_s: dict = field(default_factory=dict)


def _milp(table: ChoiceTable, cf, constraint, build) -> tuple[MilpResult, ChoiceTable]:
    """The knapsack optimum; for a non-separable closed form, re-linearize until it settles."""
    res = solve_knapsack(table.layer_s, table.mu, table.var, constraint)
    if res is None or table.separable:
        return res, table
    best, best_tps, seen = (res, table), _tps(cf, table, res.choice), set()
    for _ in range(4):
        key = tuple(res.choice.tolist())
        if key in seen:
            break
        seen.add(key)
        table = build(res.choice)
        res = solve_knapsack(table.layer_s, table.mu, table.var, constraint)
        tps = _tps(cf, table, res.choice)
        if tps > best_tps:
            best, best_tps = (res, table), tps
    return best


def _tps(cf, table: ChoiceTable, choice) -> float:
    return float(cf.tokens_per_s_many(*table.inputs(np.asarray(choice)))[0])


def _infeasible_message(table: ChoiceTable, accuracy: AccuracyModel, budget: float,
                        baselines: list[Baseline]) -> str | None:
    """When no lossy compression meets the budget — no single layer at any profiled choice, nor
    rtn8/rtn4 on every layer — the message naming the smallest reachable drop; else None."""
    best = None
    for pos, layer in enumerate(table.moe_layers):
        for c in table.options(pos):
            if c == 0:
                continue
            pred = accuracy.predict_sums(table.mu[pos, c], table.var[pos, c])
            if best is None or pred.ucb < best[0]:
                best = (pred.ucb, f"layer {layer} at {table.specs[c].describe()}")
    for b in baselines:  # rtn8/rtn4, and uniform levels the profile measured as a whole
        if b.name not in ("no compression", "lossless") and b.drop is not None:
            if best is None or b.drop.ucb < best[0]:
                best = (b.drop.ucb, f"{b.name} on every layer")
    if best is None:
        return ("no layer has a profiled choice to compress with; profile the model with "
                "--layers all")
    if best[0] <= budget:
        return None
    unit = METRIC_UNITS[accuracy.metric]
    return (f"the budget {accuracy.metric} drop <= {budget:g} is infeasible: the smallest "
            f"predicted drop reachable with any compression is {best[0]:.4g} ({unit}, one-sided "
            f"bound z={accuracy.z:g}; "
            f"{best[1]}); raise the budget to at least {best[0]:.4g} or serve the model "
            f"uncompressed")


def _study_name(req: PlanRequest, prof: ModelProfile, hw_sha: str | None, codecs) -> str:
    parts = [prof.fingerprint, req.budget, req.metric, list(codecs), req.serving.to_dict(), hw_sha,
             req.sampler, req.space, req.seed, req.z, req.cache_allocation]
    if req.per_matrix:   # only when asked, so studies made without it keep their names
        parts.append("per-matrix")
    if req.placement_traces:  # only when given, so studies made without it keep their names
        parts.append(hashlib.sha256(Path(req.placement_traces).read_bytes()).hexdigest()
                     if Path(req.placement_traces).is_file() else req.placement_traces)
    key = json.dumps(parts, sort_keys=True, default=str)
    return "moesz-plan-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _workload(req: PlanRequest, prof: ModelProfile):
    """The profile's traces laid out for the serving configuration; static placements ranked by
    `req.placement_traces` when given."""
    from sim.api import load_traces, make_workload
    from sim.workload import with_placement

    wl = make_workload(prof.geometry, req.serving, traces=prof.traces,
                       source=f"{req.profile} traces")
    if req.placement_traces:
        wl = with_placement(wl, load_traces(req.placement_traces), source=req.placement_traces)
    return wl


def _simulate(prof, hw, serving, policy, workload) -> float:
    from sim.api import simulate_policy

    run = simulate_policy(geometry=prof.geometry, hardware=hw, serving=serving, policy=policy,
                          workload=workload, ratios=prof.ratios)
    return float(run.result.tokens_per_s)


def make_plan(req: PlanRequest, out: str | None = None, progress: Progress | None = None
              ) -> PlanOutcome:
    """Plan per-layer storage for a model profile; write `out` when given.

    Raises:
        ConfigError: a bad budget, metric, codec or serving option.
        ProfileError: the model or hardware profile cannot be read.
        PlanError: the budget is infeasible (the message names the smallest reachable drop).
    """
    from profiles.hardware import load_hardware
    from sim.closed_form import ClosedFormModel

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    check_budget(req.budget)
    if req.trials < 1:
        raise ConfigError(f"--trials {req.trials} must be >= 1")
    if req.warm_trials < 0:
        raise ConfigError(f"--warm-trials {req.warm_trials} must be >= 0")
    if req.rerank < 0:
        raise ConfigError(f"--rerank {req.rerank} must be >= 0 (0: rank by the closed form only)")
    if req.verify is not None and req.verify < 0:
        raise ConfigError(f"--verify {req.verify} must be >= 0 (0: trust the prediction)")
    prof = load_profile(req.profile)
    verify_note = None
    if req.verify is None:
        req = replace(req, verify=0 if prof.synthetic else DEFAULT_VERIFY)
        if prof.synthetic:
            verify_note = ("not verified by measurement: the profile is synthetic, there is no "
                           "model to measure")
    hw = load_hardware(req.hardware)
    hw_src = hardware_source(req.hardware)
    base_metric, metric_tasks, metrics = resolve_metric(req.metric, prof)
    budget = budget_value(req.budget, req.metric)
    accuracy = AccuracyModel(prof.sensitivity, base_metric, z=req.z, tasks=metric_tasks)
    if req.per_matrix:
        accuracy.attach_matrices(prof.sensitivity)
    more = [make_budget(m, v, prof, req.z, req.per_matrix) for m, v in req.more_budgets]
    constraint = accuracy.constraint(budget)
    cf = ClosedFormModel(hw, prof.geometry, req.serving, _workload(req, prof))
    timings["setup_s"] = time.perf_counter() - t0
    routed = prof.geometry.bytes_per_expert * prof.geometry.experts_per_layer * len(
        prof.geometry.moe_layers)
    host_binds = cf.host_budget is not None and cf.host_budget < routed
    codecs = tuple(req.codecs) if req.codecs else tuple(default_codecs(
        accuracy, hw, req.serving, host_binds))
    if not codecs:
        raise ConfigError("no codec to plan with: the profile has no single-layer rows for a "
                          "GPU-decodable error-bounded codec the hardware profile can decode; "
                          "give --codecs")

    def build(reference=None) -> ChoiceTable:
        return build_table(accuracy=accuracy, geometry=prof.geometry, ratios=prof.ratios,
                           hardware=hw, serving=req.serving, closed_form=cf, codecs=codecs,
                           reference=reference, per_matrix=req.per_matrix)

    t = time.perf_counter()
    table = build()
    timings["table_s"] = time.perf_counter() - t
    first = table

    def evaluate(choice) -> float:
        return _tps(cf, first, choice)

    baselines = compute_baselines(table=table, evaluate=evaluate, accuracy=accuracy,
                                  constraint=constraint, geometry=prof.geometry,
                                  ratios=prof.ratios, hardware=hw, serving=req.serving,
                                  closed_form=cf, codecs=codecs)
    msg = _infeasible_message(table, accuracy, budget, baselines)
    if msg:
        raise PlanError(msg)
    t = time.perf_counter()
    milp, table = _milp(table, cf, constraint, build)
    if milp is None:  # raw everywhere meets any budget >= 0; kept for safety
        raise PlanError(f"--accuracy-budget {budget:g}: no assignment meets the budget")
    milp_tps = _tps(cf, table, milp.choice)
    timings["milp_s"] = time.perf_counter() - t

    space, space_note = resolve_space(req.space, table)
    req = replace(req, space=space)
    if space_note:
        table = replace(table, notes=table.notes + (space_note,))
    search = PlanSearch(table, cf, constraint, accuracy, sampler=req.sampler, space=req.space,
                        cache_allocation=req.cache_allocation, seed=req.seed,
                        storage=req.storage, study_name=_study_name(req, prof, hw_src["sha256"],
                                                                    codecs))
    t = time.perf_counter()
    cold = run_search(search, req.trials, progress=progress, label="search (cold start)")
    timings["search_cold_s"] = time.perf_counter() - t
    cold_curve = cold.best_so_far[:req.trials]
    cold_best = max((v for v in cold_curve if math.isfinite(v)), default=float("nan"))
    enqueue = [milp.choice] + [np.asarray(b.choice) for b in baselines
                               if b.choice is not None and b.feasible
                               and b.name != BEST_USER_FORMAT]  # a copy of a `uniform` row
    t = time.perf_counter()
    target = req.trials + req.warm_trials + len(enqueue)
    search.optimize(max(0, target - search.completed()), enqueue=enqueue, progress=progress,
                    label="search (warm start)")
    final = search.result(top=max(req.rerank, 1))
    timings["search_warm_s"] = time.perf_counter() - t
    if final.best is None:
        raise PlanError("the search found no assignment within the budget (the MILP optimum "
                        "should have been one); report this with the profile")

    # the best search candidates, and any feasible baseline the choice table cannot express
    # (lossless, rtn8, rtn4 on every layer), re-ranked by the discrete-event simulation
    t = time.perf_counter()
    options = [from_candidate(c, table, accuracy, cf, prof, req.serving)
               for c in final.top[:max(req.rerank, req.verify, 1)]]
    best_cf = max(o.tokens_per_s for o in options)
    # a baseline competes when the search cannot hold it: not expressible in the choice table,
    # or judged by the profile's measurement of that exact policy (the search uses the additive
    # model, whose bound on a whole-model policy is wider than the measurement's)
    options += [from_baseline(b, prof, cf, req.serving) for b in baselines
                if b.feasible and b.name != BEST_USER_FORMAT and b.policy is not None
                and b.tokens_per_s is not None
                and b.drop is not None and (b.choice is None or b.drop.kind.startswith("measured"))
                and b.tokens_per_s >= 0.95 * best_cf]  # only those that could win
    if req.rerank > 0:
        options = [replace(o, tokens_per_s_simulation=_simulate(prof, hw, o.serving, o.policy,
                                                                cf.workload))
                   for o in progress_iter(options, progress)]
        order = sorted(range(len(options)),
                       key=lambda i: (-options[i].tokens_per_s_simulation, i))
    else:
        order = sorted(range(len(options)), key=lambda i: (-options[i].tokens_per_s, i))
    options = [options[i] for i in order]

    def raw_option():   # every expert raw: exact, within any budget
        raw = from_baseline(next(b for b in baselines if b.name == "no compression"), prof, cf,
                            req.serving)
        return replace(raw, tokens_per_s_simulation=_simulate(
            prof, hw, raw.serving, raw.policy, cf.workload)) if req.rerank > 0 else raw

    if more:   # the further budgets, predicted on each option
        options = [o for o in options
                   if all(b.record(predicted_drop(b, o))["meets"] for b in more)] or [raw_option()]
    chosen = options[0]
    verification = None
    if req.verify > 0:
        from planner.verify import verify_candidates, verify_options

        tv = time.perf_counter()
        candidates = verify_candidates(
            options, req.verify, table, accuracy, budget, lambda o: from_candidate(
                o, table, accuracy, cf, prof, req.serving), lambda c: _tps(cf, table, c),
            (lambda o: _simulate(prof, hw, o.serving, o.policy, cf.workload))
            if req.rerank > 0 else None)
        verified, verification = verify_options(prof, accuracy, budget, candidates,
                                                len(candidates), progress, more)
        chosen = verified
        if verified is None:
            from planner.verify import fall_back

            measured = [from_baseline(b, prof, cf, req.serving) for b in baselines
                        if b.feasible and b.name != BEST_USER_FORMAT and b.policy is not None
                        and b.tokens_per_s is not None and b.drop is not None
                        and b.drop.kind.startswith("measured") and b.drop.ucb <= budget]
            measured = [o for o in measured
                        if all(b.record(predicted_drop(b, o))["meets"] for b in more)]
            if req.rerank > 0:
                measured = [replace(o, tokens_per_s_simulation=_simulate(
                    prof, hw, o.serving, o.policy, cf.workload)) for o in measured]
            chosen, verification = fall_back(
                verification, measured, raw_option(),
                lambda o: o.tokens_per_s_simulation if o.tokens_per_s_simulation is not None
                else o.tokens_per_s)
        timings["verify_s"] = time.perf_counter() - tv
    base_sims: dict[str, float] = {o.source.split(": ", 1)[1]: o.tokens_per_s_simulation
                                   for o in options if o.source.startswith("baseline")
                                   and o.tokens_per_s_simulation is not None}
    if req.simulate_baselines:
        for b in baselines:
            if b.policy is not None and b.tokens_per_s is not None and b.name not in base_sims:
                base_sims[b.name] = _simulate(prof, hw, req.serving, b.policy, cf.workload)
    best_user = next((b for b in baselines if b.name == BEST_USER_FORMAT and b.policy), None)
    if best_user is not None:  # the same policy as one `uniform` row: the same simulation
        twin = next((b.name for b in baselines if b is not best_user
                     and b.policy == best_user.policy and b.name in base_sims), None)
        if twin is not None:
            base_sims[BEST_USER_FORMAT] = base_sims[twin]
    timings["simulation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    doc = plan_document(req, prof, hw_src, hw, accuracy, table, chosen, options, milp, milp_tps,
                        cold, cold_best, final, baselines, base_sims, cf, codecs, budget,
                        timings)
    doc["budget"].update(unit=METRIC_UNITS[accuracy.metric], given=float(req.budget),
                         averaged_over_tasks=list(accuracy.tasks) if accuracy.metric not in
                         ("kl", "ppl") else [])
    doc["evaluation"] = metrics
    ucb = 0.0 if chosen.drop is None else float(chosen.drop.ucb)
    primary = {"metric": req.metric, "value": budget, "given": float(req.budget),
               "unit": METRIC_UNITS[accuracy.metric],
               "drop": None if chosen.drop is None else chosen.drop.to_dict(), "ucb": ucb,
               "meets": True, "used": ucb / budget if budget > 0 else 0.0}
    measured_more = (verification or {}).pop("chosen_more", None) or {}
    records = [primary] + [b.record(measured_more.get(b.metric) or predicted_drop(b, chosen))
                           for b in more]
    if more:
        doc["budgets"] = records
        doc["binding_budget"] = binding(records)
    if accuracy.metric == "kl" and metrics.get("tasks"):
        from planner.calibration import fit_calibration

        cal = fit_calibration(prof.sensitivity)
        if cal is not None:
            d = doc["predicted"]["accuracy_drop"]
            doc["kl_calibration"] = cal.to_dict()
            doc["predicted"]["content_drop_via_kl"] = cal.predict(d["value"], max(d["low"], 0.0),
                                                                  d["high"])
    if verify_note:
        doc.setdefault("notes", []).append(verify_note)
    if verification is not None:
        doc["verification"] = verification
        if verification["warning"]:
            doc.setdefault("warnings", []).append(verification["warning"])
    plan = save_plan(doc, out) if out else plan_from_dict(doc)
    return PlanOutcome(plan, table, milp, cold, final, baselines, accuracy, cf, prof, search.study,
                       timings)


# re-exported: the demo and the CLI import the plots from here
from planner.plots import budget_sweep, write_plots  # noqa: E402,F401

__all__ = ["PlanOutcome", "PlanRequest", "budget_sweep", "check_budget", "make_plan",
           "write_plots"]
