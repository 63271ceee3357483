"""The Optuna search over per-layer storage choices (and, optionally, the cache allocation).

Two search spaces, both deciding one storage choice per MoE layer (`auto`, the default, takes
`per-layer` when the choice table has at most `AUTO_PER_LAYER_MAX` assignments, else
`lagrangian`):

- `lagrangian`: two parameters, the prices of accuracy and of its variance
  (log-uniform); a trial's choice at layer l is argmin_c t[l, c] + p_mu * mu[l, c] + p_var *
  var[l, c] (layer time, mean drop and variance, normalized by the largest layer time, the budget
  and the budget squared). Every Lagrangian solution of the knapsack is reachable, and the search
  is two-dimensional whatever the number of layers.
- `per-layer`: one parameter per MoE layer, an integer index into the layer's choices ordered by
  predicted layer time (raw first), so TPE's Parzen estimators see neighbouring levels as
  neighbours. Closest to the problem's statement and best on small tables, but from 12 layers
  up TPE misses the feasible region or the optimum (see docs/planning.md for the measured gaps).

The objective is the predicted decode tokens/s of the closed-form cost model (`sim.closed_form`)
on the full assignment; the accuracy model enters as a constraint through `Trial.set_constraint`
(Optuna 5): g(M, V) - budget <= 0. TPE (multivariate) by default; NSGA-II for a multi-objective
study whose Pareto front is throughput, predicted accuracy drop and host memory of the stored
experts. Known assignments (the MILP optimum, baselines) are enqueued with `enqueue_trial`; in
the Lagrangian space they carry their assignment as a user attribute, which the objective uses
instead of decoding prices.

With `cache_allocation`, each layer also gets a share in [0, 1] of the GPU expert cache; the
slots follow the shares (`per_layer_cache_slots`) and each trial is scored by a closed form built
for that allocation.

Studies live in any Optuna storage (`storage=None` is in memory); the same study name resumes
and can be shared by workers. The same seed gives the same trials.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import optuna

from planner.accuracy import AccuracyModel, Constraint
from planner.choices import ChoiceTable
from profiles.errors import ConfigError

Progress = Callable[[int, int, str], None]
SAMPLERS = ("tpe", "nsga2")
SPACES = ("auto", "lagrangian", "per-layer")
# `auto` searches per layer when there are at most this many assignments, else by prices: measured,
# per-layer TPE reaches the MILP optimum on the built-in model's 3^8 = 6,561 (gap 0.10 % in 150
# trials, where the prices stall at 6.3 %: its optimum is off their convex hull) but misses it by
# 1-13 % from 9^8 = 4.3e7 up, where the prices reach it (benchmarks/RESULTS.md, search spaces)
AUTO_PER_LAYER_MAX = 100_000


def resolve_space(space: str, table: ChoiceTable) -> tuple[str, str]:
    """(the space to search, a note saying why) for a requested space; `auto` picks by the
    number of assignments of the choice table."""
    if space not in SPACES:
        raise ConfigError(f"--space {space!r} is unknown; choose {', '.join(SPACES)}")
    if space != "auto":
        return space, ""
    n = math.prod(len(table.options(pos)) for pos in range(len(table.moe_layers)))
    chosen = "per-layer" if n <= AUTO_PER_LAYER_MAX else "lagrangian"
    return chosen, (f"search space auto -> {chosen} ({n:.3g} assignments; per-layer up to "
                    f"{AUTO_PER_LAYER_MAX:,})")
PRICE_RANGE = (1e-4, 1e4)  # normalized prices, log-uniform


@dataclass(frozen=True)
class Candidate:
    """One evaluated assignment."""

    choice: tuple[int, ...]
    tokens_per_s: float
    M: float
    V: float
    host_bytes: int
    feasible: bool
    trial: int
    per_layer_cache_slots: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SearchResult:
    """What a study found.

    Attributes:
        best: the best feasible candidate (None when no trial was feasible).
        top: the best distinct feasible candidates, best first.
        pareto: the feasible Pareto front of tokens/s, mean drop and host bytes (NSGA-II's own
            front, or the non-dominated feasible trials of a TPE study).
        trials: completed trials in the study (all phases).
        best_so_far: best feasible tokens/s after each trial, in trial order (NaN before any).
        study_name, storage: where the study lives.
        wall_s: measured wall time of this call.
    """

    best: Candidate | None
    top: tuple[Candidate, ...]
    pareto: tuple[Candidate, ...]
    trials: int
    best_so_far: tuple[float, ...] = field(repr=False)
    study_name: str = ""
    storage: str | None = None
    wall_s: float = 0.0

    def trials_to_within(self, reference: float, rel: float) -> int | None:
        """Trials until the best feasible value came within `rel` of `reference` (None: never)."""
        for i, v in enumerate(self.best_so_far):
            if math.isfinite(v) and v >= reference * (1 - rel):
                return i + 1
        return None


def _order(table: ChoiceTable, pos: int) -> list[int]:
    """Choices at a layer, raw first then by predicted layer time, slowest first."""
    opts = table.options(pos)
    return sorted(opts, key=lambda c: (c != 0, -table.layer_s[pos, c], c))


class PlanSearch:
    """An Optuna study over the choice table.

    Args:
        table: the choice table.
        closed_form: the `ClosedFormModel` that scores a trial.
        constraint: the accuracy constraint.
        accuracy: the accuracy model (for the drop objective of NSGA-II).
        sampler: `tpe` (default) or `nsga2`.
        space: `auto` (default: `per-layer` for small tables, else `lagrangian`), `lagrangian`
            or `per-layer`.
        cache_allocation: also search the per-layer cache allocation.
        seed: sampler seed.
        storage: Optuna storage URL (None = in memory).
        study_name: name of the study (resumes when it exists in `storage`).
    """

    def __init__(self, table: ChoiceTable, closed_form: Any, constraint: Constraint,
                 accuracy: AccuracyModel, *, sampler: str = "tpe", space: str = "auto",
                 cache_allocation: bool = False, seed: int = 0, storage: str | None = None,
                 study_name: str = "moesz-plan") -> None:
        if sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {sampler!r} is unknown; choose {', '.join(SAMPLERS)}")
        space, _ = resolve_space(space, table)
        self.table, self.cf = table, closed_form
        self.constraint, self.accuracy = constraint, accuracy
        self.sampler_name, self.space, self.seed = sampler, space, seed
        self.cache_allocation = cache_allocation
        self.orders = [_order(table, pos) for pos in range(len(table.moe_layers))]
        self.labels = table.labels
        av = table.available
        t = np.where(av, table.layer_s, np.inf)
        span = float(np.nanmax(np.abs(table.layer_s[av]))) or 1.0
        B = max(constraint.budget, 1e-12)
        self._t_n = t / span
        self._mu_n = np.where(av, table.mu, 0.0) / B
        self._var_n = np.where(av, table.var, 0.0) / B ** 2
        self._cf_memo: dict[tuple[int, ...], Any] = {}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if sampler == "tpe":
            smp = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                             )
            directions = ["maximize"]
        else:
            smp = optuna.samplers.NSGAIISampler(seed=seed)
            directions = ["maximize", "minimize", "minimize"]
        self.storage = storage
        # the profiler's storage opener: URL checks, journal files, SQLite claims made atomic
        from profiles.profiling.sweep import open_storage

        backend = open_storage(storage, "") if storage is not None else None
        try:
            self.study = optuna.create_study(storage=backend, study_name=study_name, sampler=smp,
                                             directions=directions, load_if_exists=True)
        except ValueError as exc:  # e.g. an existing study with other directions
            raise ConfigError(f"--storage {storage}: study {study_name!r} cannot be used "
                              f"({exc}); choose another --storage or study") from None
        self.study_name = study_name

    # -- parameters ----------------------------------------------------------------------------
    def params_of(self, choice: Sequence[int], shares: Sequence[float] | None = None) -> dict:
        """Trial parameters of an assignment, for `enqueue_trial` (per-layer space: exact;
        Lagrangian space: the prices of the best trial so far, or the middle of the range — the
        assignment itself travels as the `fixed_choice` user attribute)."""
        out: dict[str, Any] = {}
        if self.space == "per-layer":
            for pos, (layer, c) in enumerate(zip(self.table.moe_layers, choice)):
                out[f"layer_{layer}"] = self.orders[pos].index(int(c))
        else:
            try:
                out.update({k: v for k, v in self.study.best_trials[0].params.items()
                            if k.startswith("price_")})
            except (ValueError, IndexError):
                pass
            out.setdefault("price_accuracy", 1.0)
            out.setdefault("price_variance", 1.0)
        if self.cache_allocation:
            for layer, s in zip(self.table.moe_layers, shares or [0.5] * len(choice)):
                out[f"cache_{layer}"] = float(s)
        return out

    def decode(self, price_accuracy: float, price_variance: float) -> np.ndarray:
        """The Lagrangian assignment for two prices (per layer, the cheapest priced choice)."""
        score = self._t_n + price_accuracy * self._mu_n + price_variance * self._var_n
        return np.argmin(score, axis=1)

    def _suggest(self, trial) -> tuple[np.ndarray, tuple[int, ...] | None]:
        if self.space == "per-layer":
            choice = np.zeros(len(self.table.moe_layers), dtype=int)
            for pos, layer in enumerate(self.table.moe_layers):
                order = self.orders[pos]
                choice[pos] = order[trial.suggest_int(f"layer_{layer}", 0, len(order) - 1)]
        else:
            pa = trial.suggest_float("price_accuracy", *PRICE_RANGE, log=True)
            pv = trial.suggest_float("price_variance", *PRICE_RANGE, log=True)
            choice = self.decode(pa, pv)
        fixed = trial.user_attrs.get("fixed_choice")
        if fixed is not None:
            choice = np.asarray(fixed, dtype=int)
        slots = None
        if self.cache_allocation:
            shares = np.array([trial.suggest_float(f"cache_{layer}", 0.0, 1.0)
                               for layer in self.table.moe_layers])
            slots = allocate_slots(shares, self.total_slots(), self.table.experts_per_layer)
        return choice, slots

    def total_slots(self) -> int:
        cap = self.cf.capacity
        per = float(self.cf.original_bytes)
        return int(cap // per) if math.isfinite(cap) else len(self.table.moe_layers) * \
            self.table.experts_per_layer

    def _model(self, slots: tuple[int, ...] | None):
        if slots is None:
            return self.cf
        cf = self._cf_memo.get(slots)
        if cf is None:
            from sim.closed_form import ClosedFormModel

            serving = replace(self.cf.serving, per_layer_cache_slots=slots)
            cf = ClosedFormModel(self.cf.hw, self.cf.g, serving, self.cf.workload,
                                 stats=self.cf.stats, times=self.cf.times)
            if len(self._cf_memo) > 256:
                self._cf_memo.clear()
            self._cf_memo[slots] = cf
        return cf

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, choice: np.ndarray, slots: tuple[int, ...] | None = None
                 ) -> tuple[float, float, float, int]:
        """(tokens/s, M, V, host bytes) of an assignment, by the full closed form."""
        b, g, c = self.table.inputs(choice)
        tps = float(self._model(slots).tokens_per_s_many(b, g, c)[0])
        M, V = self.table.sums(choice)
        return tps, M, V, self.table.host_bytes(choice)

    def _objective(self, trial):
        choice, slots = self._suggest(trial)
        tps, M, V, host = self.evaluate(choice, slots)
        viol = float(self.constraint.g(M, V)) - self.constraint.budget
        trial.set_constraint("accuracy", viol)
        trial.set_user_attr("M", M)
        trial.set_user_attr("V", V)
        trial.set_user_attr("host_bytes", host)
        trial.set_user_attr("choice", [int(x) for x in choice])
        if slots is not None:
            trial.set_user_attr("slots", list(slots))
        if self.sampler_name == "tpe":
            return tps
        return tps, self.accuracy.predict_sums(M, V).drop, float(host)

    def optimize(self, n_trials: int, *, enqueue: Sequence[Sequence[int]] = (),
                 progress: Progress | None = None, label: str = "search") -> None:
        """Run up to `n_trials` more trials, the enqueued assignments first."""
        have = {tuple(t.user_attrs.get("fixed_choice") or ())
                for t in self.study.get_trials(deepcopy=False)}
        for ch in enqueue:
            fixed = [int(c) for c in ch]
            if tuple(fixed) not in have:  # resuming: each known assignment is enqueued once
                have.add(tuple(fixed))
                self.study.enqueue_trial(self.params_of(ch), user_attrs={"fixed_choice": fixed})
        if n_trials <= 0:
            return
        done = [0]

        def cb(study, trial):
            done[0] += 1
            if progress:
                progress(done[0], n_trials, label)

        self.study.optimize(self._objective, n_trials=n_trials, callbacks=[cb],
                            gc_after_trial=False)

    def completed(self) -> int:
        return len(self.study.get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.COMPLETE,)))

    def result(self, top: int = 5, wall_s: float = 0.0) -> SearchResult:
        trials = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        trials = sorted(trials, key=lambda t: t.number)
        cands, curve, best = [], [], -math.inf
        for t in trials:
            feasible = all(v <= 0 for v in t.constraints.values())
            tps = float(t.values[0])
            slots = t.user_attrs.get("slots")
            cand = Candidate(tuple(t.user_attrs["choice"]), tps, t.user_attrs["M"],
                             t.user_attrs["V"], int(t.user_attrs["host_bytes"]), feasible,
                             t.number, tuple(slots) if slots else None)
            cands.append(cand)
            if feasible:
                best = max(best, tps)
            curve.append(best if math.isfinite(best) else float("nan"))
        feas = sorted((c for c in cands if c.feasible), key=lambda c: (-c.tokens_per_s, c.trial))
        distinct, seen = [], set()
        for c in feas:
            key = (c.choice, c.per_layer_cache_slots)
            if key not in seen:
                seen.add(key)
                distinct.append(c)
        if self.sampler_name == "nsga2":
            front = {t.number for t in self.study.best_trials}
            pareto = tuple(sorted((c for c in distinct if c.trial in front),
                                  key=lambda c: -c.tokens_per_s))
        else:  # the non-dominated feasible trials of the single-objective study
            pareto = tuple(c for c in distinct if not any(
                _dominates(d, c) for d in distinct))
        return SearchResult(distinct[0] if distinct else None, tuple(distinct[:top]), pareto,
                            len(trials), tuple(curve), self.study_name, self.storage, wall_s)


def _dominates(a: Candidate, b: Candidate) -> bool:
    """a is at least as good as b in tokens/s, mean drop and host bytes, and better in one."""
    ge = (a.tokens_per_s >= b.tokens_per_s and a.M <= b.M and a.host_bytes <= b.host_bytes)
    gt = (a.tokens_per_s > b.tokens_per_s or a.M < b.M or a.host_bytes < b.host_bytes)
    return ge and gt


def allocate_slots(shares: np.ndarray, total: int, experts_per_layer: int) -> tuple[int, ...]:
    """Split `total` cache slots over layers in proportion to `shares` (at most all experts of a
    layer each; largest remainders first, deterministic)."""
    L = len(shares)
    w = np.asarray(shares, dtype=float)
    w = np.full(L, 1.0 / L) if w.sum() <= 0 else w / w.sum()
    total = min(int(total), L * experts_per_layer)
    raw = w * total
    slots = np.minimum(np.floor(raw).astype(int), experts_per_layer)
    rest = total - int(slots.sum())
    order = np.lexsort((np.arange(L), -(raw - np.floor(raw))))
    while rest > 0:
        moved = False
        for i in order:
            if rest == 0:
                break
            if slots[i] < experts_per_layer:
                slots[i] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return tuple(int(s) for s in slots)


def run_search(search: PlanSearch, n_trials: int, *, progress: Progress | None = None,
               enqueue: Sequence[Sequence[int]] = (), label: str = "search",
               top: int = 5) -> SearchResult:
    """Run the study to `n_trials` completed trials in total (resuming counts earlier ones)."""
    t0 = time.perf_counter()
    remaining = max(0, n_trials - search.completed())
    search.optimize(remaining, enqueue=enqueue, progress=progress, label=label)
    return search.result(top=top, wall_s=time.perf_counter() - t0)
