"""The baselines every plan is compared with, each with its predicted tokens/s and accuracy drop.

- `no compression`: every expert raw.
- `lossless`: every expert through the lossless codec (bit-exact, so no accuracy change).
- `uniform CODEC`: one level for every layer, the largest profiled level whose predicted drop
  bound meets the budget.
- `protect middle third`: the heuristic of the MoE-compression study (Ma et al., arXiv
  2509.07727): the middle third of the MoE layers raw, the shallow and deep thirds at the largest
  level that meets the budget.
- `uniform FORMAT` for every format users run that the profile measured (`gq`, `nf4`, `mxfp4`,
  the GGUF k-quants; not error-bounded, one setting each), and `best user format`: the fastest of
  them that meets the budget (issue 20: a plan is compared with what users would run instead).
- `rtn8`, `rtn4`: moesz's own round-to-nearest 8- and 4-bit with one absmax scale per row
  (labelled "per-row absmax"; weaker than the formats users run at the same bytes).

Throughput is the closed form's prediction. Accuracy of a uniform policy (one setting on every
layer) comes from the profile's own measurement of exactly that policy (target `all`) when it has
one — direct evidence, with one measurement's interval — and otherwise from the same additive
model as the plan, whose uncertainty adds up every layer's own; the additive prediction is kept
beside a measured one. A baseline judged by a measurement says so (`accuracy_drop.kind`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from planner.accuracy import AccuracyModel, Constraint, DropPrediction
from planner.choices import ChoiceTable
from profiles.errors import MoeszError
from profiles.policy import Policy, StorageSpec


RTN_BASELINES = ("rtn8", "rtn4")
BEST_USER_FORMAT = "best user format"
# not formats users run: bit-exact ones, and moesz's own per-row rtn
_NOT_USER_FORMATS = ("raw", "lossless") + RTN_BASELINES


def uniform_spec(policy: Policy) -> str:
    """The one spec of a uniform policy (every layer the same), as `StorageSpec.describe` writes
    it; a choice-table policy keeps it per layer over a raw default."""
    specs = {s.describe() for s in policy.layers.values()}
    if len(specs) == 1 and (not policy.experts):
        return specs.pop()
    return policy.default.describe()


def user_format_labels(accuracy: AccuracyModel) -> list[str]:
    """Labels of the formats users run (no bound: gq, nf4, mxfp4, GGUF types) that the profile
    has rows for, single-layer or whole-model, sorted."""
    from profiles.codecs import get_codec

    labels = {lab for (_, lab) in accuracy.effects} | {lab for (t, lab) in accuracy.multi
                                                       if t == "all"}
    out = []
    for lab in labels:
        codec = lab.split(":")[0].split(",")[0]
        if codec in _NOT_USER_FORMATS:
            continue
        try:
            if get_codec(codec).error_bounded:
                continue
        except MoeszError:
            continue
        out.append(lab)
    return sorted(out)


@dataclass(frozen=True)
class Baseline:
    """One baseline policy and what is predicted for it."""

    name: str
    policy: Policy | None
    tokens_per_s: float | None
    drop: DropPrediction | None
    feasible: bool
    host_bytes: int | None
    measured_all: dict | None = None
    note: str = ""
    choice: tuple[int, ...] | None = None  # in the choice table, when expressible there

    @property
    def label(self) -> str:
        """The name as tables show it: what the policy is, not only its key."""
        if self.name in RTN_BASELINES:
            return f"{self.name} (per-row absmax)"
        if self.name == BEST_USER_FORMAT and self.policy is not None:
            return f"{BEST_USER_FORMAT}: {uniform_spec(self.policy)}"
        return self.name

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label,
                "policy": None if self.policy is None else _describe(self.policy),
                "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_kind": "predicted (closed form)",
                "accuracy_drop": None if self.drop is None else self.drop.to_dict(),
                "accuracy_drop_measured_all": self.measured_all,
                "meets_budget": self.feasible, "host_bytes": self.host_bytes, "note": self.note}


def _describe(policy: Policy) -> str:
    if not policy.layers:
        return policy.default.describe()
    specs = {s.describe() for s in policy.layers.values()}
    return f"{len(policy.layers)} layers: " + ", ".join(sorted(specs)) + \
        f"; others {policy.default.describe()}"


def _table_baseline(name: str, table: ChoiceTable, choice: np.ndarray, evaluate, accuracy,
                    constraint: Constraint, note: str = "") -> Baseline:
    tps = evaluate(choice)
    M, V = table.sums(choice)
    additive = accuracy.predict_sums(M, V)
    label = table.specs[int(choice[0])].describe() if len(set(choice.tolist())) == 1 else None
    measured = accuracy.measured_uniform(label) if label and label != "raw" else None
    if measured is not None:
        pred, feasible = measured, measured.ucb <= constraint.budget
        note = "; ".join(x for x in (note, _measured_note(additive)) if x)
    else:
        pred, feasible = additive, constraint.feasible(M, V)
    return Baseline(name, table.policy(choice), tps, pred, feasible, table.host_bytes(choice),
                    None if measured is None else _measured_dict(measured), note,
                    tuple(int(c) for c in choice))


def _measured_note(additive: DropPrediction) -> str:
    return (f"accuracy from the profile's measurement of this exact policy (the additive model "
            f"predicts {additive.drop:+.4f}, upper bound {additive.ucb:.4f})")


def _measured_dict(pred: DropPrediction) -> dict:
    return {"value": pred.drop, "sd": pred.sd, "kind": "measured (profile, target all)"}


def uniform_feasible(accuracy: AccuracyModel, constraint: Constraint, table: ChoiceTable,
                     c: int) -> bool:
    """Whether choice `c` on every layer meets the budget: by the profile's measurement of that
    policy when it has one, else by the additive model."""
    measured = accuracy.measured_uniform(table.specs[c].describe())
    if measured is not None:
        return measured.ucb <= constraint.budget
    return constraint.feasible(*table.sums(np.full(len(table.moe_layers), c)))


def _spec_baseline(name: str, spec: StorageSpec, *, geometry, ratios, hardware, serving,
                   closed_form, accuracy: AccuracyModel, constraint: Constraint,
                   note: str = "") -> Baseline:
    """A uniform spec outside the choice table (lossless, rtn8, rtn4, user formats the planner
    does not search)."""
    from sim.costs import build_costs

    label = spec.describe()
    policy = Policy(default=spec)
    try:
        costs = build_costs(geometry, policy, hardware, serving, ratios)
    except MoeszError as exc:
        return Baseline(name, policy, None, None, False, None, note=f"not predicted: {exc}")
    base_note = note
    b, g, c = closed_form.inputs_from_costs(costs)
    tps = float(closed_form.tokens_per_s(b, g, c))
    host = int(costs.stored_bytes.sum())
    measured = accuracy.measured_uniform(label)
    try:
        additive = accuracy.predict({layer: label for layer in geometry.moe_layers})
    except MoeszError:
        additive = None
    if measured is not None:
        pred = measured
        note = (_measured_note(additive) if additive is not None else
                "accuracy from the profile's measurement of this exact policy (no single-layer "
                "rows)")
    elif additive is not None:
        pred, note = additive, ""
    else:
        return Baseline(name, policy, tps, None, False, host, None,
                        "; ".join(x for x in (base_note, f"the profile has no sensitivity rows "
                                                         f"for {label}") if x))
    note = "; ".join(x for x in (base_note, note) if x)
    return Baseline(name, policy, tps, pred, pred.ucb <= constraint.budget, host,
                    None if measured is None else _measured_dict(measured), note)


def compute_baselines(*, table: ChoiceTable, evaluate, accuracy: AccuracyModel,
                      constraint: Constraint, geometry: Any, ratios: Any, hardware: Any,
                      serving: Any, closed_form: Any, codecs: Sequence[str]) -> list[Baseline]:
    """All baselines. `evaluate(choice) -> tokens/s` scores a choice-table assignment."""
    L = len(table.moe_layers)
    av = table.available
    shipped = getattr(geometry, "dtype", "bf16")
    out = [_table_baseline("no compression", table, np.zeros(L, dtype=int), evaluate, accuracy,
                           constraint, "" if shipped in ("bf16", "fp16", "fp32") else
                           f"the experts as the checkpoint ships them ({shipped}, "
                           f"{int(geometry.bytes_per_expert):,} B per expert)")]
    out.append(_spec_baseline("lossless", StorageSpec("lossless"), geometry=geometry,
                              ratios=ratios, hardware=hardware, serving=serving,
                              closed_form=closed_form, accuracy=accuracy, constraint=constraint))
    thirds = np.array_split(np.arange(L), 3)
    middle = set(thirds[1].tolist()) if L >= 3 else set()
    for codec in codecs:
        idx = [c for c, s in enumerate(table.specs) if s.codec == codec]
        idx.sort(key=lambda c: table.specs[c].level)
        full = [c for c in idx if av[:, c].all()]
        best = None
        for c in full:
            if uniform_feasible(accuracy, constraint, table, c):
                best = c
        if not full:
            out.append(Baseline(f"uniform {codec}", None, None, None, False, None,
                                note=f"the profile has no {codec} level with single-layer rows "
                                     f"at every MoE layer"))
        elif best is None:
            lowest = table.specs[full[0]].describe()
            out.append(Baseline(f"uniform {codec}", None, None, None, False, None,
                                note=f"no uniform level meets the budget (the lowest, {lowest}, "
                                     f"does not)"))
        else:
            out.append(_table_baseline(f"uniform {codec}", table, np.full(L, best), evaluate,
                                       accuracy, constraint, "largest uniform level that meets "
                                       "the budget"))
        best_h = None
        for c in full:
            ch = np.array([0 if pos in middle else c for pos in range(L)])
            if constraint.feasible(*table.sums(ch)):
                best_h = ch
        if best_h is None:
            why = ("no level on the shallow and deep thirds meets the budget" if full else
                   f"the profile has no {codec} level with single-layer rows at every MoE layer")
            out.append(Baseline(f"protect middle third ({codec})", None, None, None, False, None,
                                note=why))
        else:
            out.append(_table_baseline(f"protect middle third ({codec})", table, best_h, evaluate,
                                       accuracy, constraint, "study heuristic: middle third raw, "
                                       "shallow and deep thirds at the largest level that meets "
                                       "the budget"))
    out += user_format_baselines(out, accuracy=accuracy, constraint=constraint,
                                 geometry=geometry, ratios=ratios, hardware=hardware,
                                 serving=serving, closed_form=closed_form, codecs=codecs)
    for codec in RTN_BASELINES:
        out.append(_spec_baseline(codec, StorageSpec(codec), geometry=geometry, ratios=ratios,
                                  hardware=hardware, serving=serving, closed_form=closed_form,
                                  accuracy=accuracy, constraint=constraint,
                                  note="moesz's round-to-nearest with one absmax scale per row"))
    return out


def user_format_baselines(done: list[Baseline], *, accuracy: AccuracyModel,
                          constraint: Constraint, geometry: Any, ratios: Any, hardware: Any,
                          serving: Any, closed_form: Any, codecs: Sequence[str]
                          ) -> list[Baseline]:
    """`uniform FORMAT` for each profiled user format the choice table did not already cover,
    then `best user format`: the fastest uniform user format that meets the budget."""
    out = []
    rows: list[Baseline] = [b for b in done if b.name.startswith("uniform ")
                            and b.name[8:] in codecs and _is_user(b.name[8:])]
    for label in user_format_labels(accuracy):
        codec = label.split(",")[0]
        if codec in codecs:
            continue  # the codec loop above made its `uniform` row from the choice table
        b = _spec_baseline(f"uniform {label}", StorageSpec.parse(label), geometry=geometry,
                           ratios=ratios, hardware=hardware, serving=serving,
                           closed_form=closed_form, accuracy=accuracy, constraint=constraint)
        out.append(b)
        rows.append(b)
    ok = [b for b in rows if b.feasible and b.policy is not None and b.tokens_per_s is not None
          and b.drop is not None]
    if ok:
        best = max(ok, key=lambda b: b.tokens_per_s)
        others = ", ".join(sorted(b.name[8:] for b in rows if b is not best))
        out.append(Baseline(BEST_USER_FORMAT, best.policy, best.tokens_per_s, best.drop, True,
                            best.host_bytes, best.measured_all,
                            f"{uniform_spec(best.policy)} on every layer: the fastest "
                            f"uniform format users run that meets the budget (also profiled: "
                            f"{others or 'none'})", best.choice))
    elif rows:
        out.append(Baseline(BEST_USER_FORMAT, None, None, None, False, None,
                            note="no uniform format users run meets the budget (profiled: "
                                 + ", ".join(sorted(b.name[8:] for b in rows)) + ")"))
    else:
        out.append(Baseline(BEST_USER_FORMAT, None, None, None, False, None,
                            note="the profile measured no format users run; profile with "
                                 "--codecs nf4,mxfp4,q4_k,q3_k,gq (plus the planner's codecs)"))
    return out


def _is_user(codec: str) -> bool:
    from profiles.codecs import get_codec

    try:
        return codec not in _NOT_USER_FORMATS and not get_codec(codec).error_bounded
    except MoeszError:
        return False
