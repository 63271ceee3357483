"""The plan document: what `moesz plan` writes, assembled from the planning results.

`from_candidate` and `from_baseline` turn a search candidate or a baseline into an `Option` (a
policy competing to become the plan, with its per-layer rows); `plan_document` builds the JSON
document of `planner.plan` (fields in docs/planning.md) from the chosen option and the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from planner.baselines import Baseline
from planner.choices import ChoiceTable
from planner.plan import KIND, SCHEMA_VERSION
from profiles.serving import ServingConfig


def _matrices(policy, moe_layers, accuracy) -> dict:
    """What a `--per-matrix` plan did with the matrices: the kinds it planned a level for and
    which it protects (`planner.protection`)."""
    from planner.protection import matrix_summary

    return {"kinds": list(accuracy.matrix_kinds), "summary": matrix_summary(policy, moe_layers)}


def serving_for(serving: ServingConfig, cand) -> ServingConfig:
    """The serving configuration of a candidate (its per-layer cache slots, when searched)."""
    if cand.per_layer_cache_slots is None:
        return serving
    return ServingConfig.from_dict({**serving.to_dict(),
                                    "per_layer_cache_slots": list(cand.per_layer_cache_slots)})


@dataclass(frozen=True)
class Option:
    """A policy competing to become the plan: a search candidate or a feasible baseline."""

    source: str
    policy: Any
    serving: ServingConfig
    tokens_per_s: float  # closed form
    drop: Any  # DropPrediction
    host_bytes: int
    layers: list
    tokens_per_s_simulation: float | None = None
    trial: int | None = None


def progress_iter(items, progress):
    """Yield items, reporting `progress(done, total, 'simulating candidates')` after each."""
    for i, x in enumerate(items):
        yield x
        if progress:
            progress(i + 1, len(items), "simulating candidates")


def from_candidate(c, table: ChoiceTable, accuracy, cf, prof, serving) -> Option:
    layers = []
    for pos, (layer, k) in enumerate(zip(table.moe_layers, c.choice)):
        spec = table.specs[k]
        layers.append({"layer": int(layer), "codec": spec.codec, "mode": spec.mode,
                       "level": spec.level, "spec": spec.describe(),
                       "drop": float(table.mu[pos, k]), "drop_sd": math.sqrt(table.var[pos, k]),
                       "stored_bytes_per_expert": float(table.stored_bytes[pos, k]),
                       "ratio": float(cf.original_bytes / table.stored_bytes[pos, k]),
                       "layer_s_per_step": float(table.layer_s[pos, k]),
                       **({"matrices": {k: s.describe() for k, s in zip(spec.kinds, spec.specs)}}
                          if hasattr(spec, "kinds") else {})})
    return Option(f"search trial {c.trial}", table.policy(c.choice, prof.fingerprint),
                   serving_for(serving, c), c.tokens_per_s, accuracy.predict_sums(c.M, c.V),
                   c.host_bytes, layers, trial=c.trial)


def from_baseline(b: Baseline, prof, cf, serving) -> Option:
    layers = []
    for layer in prof.geometry.moe_layers:
        spec = b.policy.layers.get(layer, b.policy.default)
        ratio = float(prof.ratios.ratio(layer, spec, prof.geometry))
        layers.append({"layer": int(layer), "codec": spec.codec, "mode": spec.mode,
                       "level": spec.level, "spec": spec.describe(), "drop": None,
                       "drop_sd": None, "stored_bytes_per_expert": cf.original_bytes / ratio,
                       "ratio": ratio, "layer_s_per_step": None})
    return Option(f"baseline: {b.name}", b.policy.with_fingerprint(prof.fingerprint), serving,
                   float(b.tokens_per_s), b.drop, int(b.host_bytes), layers)


def decode_speed_notes(prof, hw, serving, policies) -> list[str]:
    """Where the decode speeds of these policies come from (measured, preset, or estimated and
    labelled so: `sim.costs`), one line per codec and place, sorted."""
    from profiles.errors import MoeszError
    from sim.costs import build_costs

    out: set[str] = set()
    for policy in policies:
        try:
            labels = build_costs(prof.geometry, policy, hw, serving, prof.ratios).labels
        except MoeszError:
            continue
        out |= {lab for lab in labels if " decode: " in lab}
    return sorted(out)


def plan_document(req, prof, hw_src, hw, accuracy, table, chosen: Option, options, milp, milp_tps,
              cold, cold_best, final, baselines, base_sims, cf, codecs, budget, timings) -> dict:
    pred = chosen.drop
    warnings = []
    w = accuracy.detection_warning(budget, prof.detection_limit)
    if w:
        warnings.append(w)
    if prof.synthetic:
        warnings.append("the model profile is SYNTHETIC (generated, not measured): accuracy "
                        "figures are illustrations, not predictions for a real model")
    if all(x["codec"] == "raw" for x in chosen.layers):
        warnings.append("the plan keeps every layer raw: compression does not raise predicted "
                        "throughput in this configuration (experts fit in GPU memory, or the "
                        "link is not the bottleneck)")
    if chosen.source.startswith("baseline"):
        basis = (" (its accuracy is the profile's measurement of this exact policy, not the "
                 "additive model's sum over layers)" if pred is not None
                 and pred.kind.startswith("measured") else "")
        warnings.append(f"the plan is the {chosen.source}: it meets the budget{basis} and is "
                        f"predicted faster than every per-layer assignment of the codecs "
                        f"searched ({', '.join(codecs)})")
    notes = list(dict.fromkeys(list(cf.notes) + list(table.notes) + [accuracy.additivity.note]
                               + decode_speed_notes(prof, hw, req.serving, [chosen.policy] + [
                                   b.policy for b in baselines if b.policy is not None])))
    if req.serving.cache_policy == "lfu" or req.serving.prefetch != "none":
        notes.append("the search scores LFU as LRU and ignores prefetch (closed-form proxy); the "
                     "simulation re-ranks under the requested configuration")
    metric_unit = "nats" if req.metric == "kl" else "fraction of prompts"
    cold_gap = (1 - cold_best / milp_tps) if math.isfinite(cold_best) and milp_tps > 0 else None
    search_doc = {
        "sampler": req.sampler, "space": req.space, "seed": req.seed, "storage": req.storage,
        "study_name": final.study_name, "trials_total": final.trials,
        "cold_start": {"trials": req.trials,
                       "best_tokens_per_s": cold_best if math.isfinite(cold_best) else None,
                       "gap_to_milp": cold_gap,
                       "trials_to_within_1pct": cold.trials_to_within(milp_tps, 0.01),
                       "wall_s": timings.get("search_cold_s")},
        "warm_start": {"enqueued": ["milp"] + [b.name for b in baselines
                                               if b.choice is not None and b.feasible
                                               and b.name != "best user format"],
                       "best_tokens_per_s": final.best.tokens_per_s},
    }
    candidates = [{"rank": rank + 1, "source": o.source, "trial": o.trial,
                   "tokens_per_s_closed_form": o.tokens_per_s,
                   "tokens_per_s_simulation": o.tokens_per_s_simulation,
                   "accuracy_drop": o.drop.to_dict(), "host_bytes": o.host_bytes,
                   "layers": [x["spec"] for x in o.layers]} for rank, o in enumerate(options)]
    pareto = [{"trial": c.trial, "tokens_per_s": c.tokens_per_s,
               "accuracy_drop": accuracy.predict_sums(c.M, c.V).drop, "host_bytes": c.host_bytes}
              for c in final.pareto]
    base_docs = []
    for b in baselines:
        d = b.to_dict()
        d["tokens_per_s_simulation"] = base_sims.get(b.name)
        base_docs.append(d)
    sim_tps = chosen.tokens_per_s_simulation
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": req.command,
        "model": {"fingerprint": prof.fingerprint, "spec": prof.doc.get("model", {}).get("spec"),
                  "geometry_name": prof.geometry.name, "profile": str(prof.path),
                  "profile_source": prof.source_label, "moe_layers": list(table.moe_layers)},
        "policy": chosen.policy.to_dict(),
        "serving": chosen.serving.to_dict(),
        "hardware": {**hw_src, "name": hw.name},
        "budget": {"metric": req.metric, "value": budget, "unit": metric_unit,
                   "bound": "one-sided upper confidence bound", "z": accuracy.z,
                   "averaged_over_tasks": accuracy.tasks},
        "codecs": list(codecs),
        **({"matrices": _matrices(chosen.policy, table.moe_layers, accuracy)}
           if req.per_matrix else {}),
        "layers": chosen.layers,
        "predicted": {
            "source": chosen.source,
            "tokens_per_s": sim_tps if sim_tps is not None else chosen.tokens_per_s,
            "tokens_per_s_kind": "predicted (discrete-event simulation)" if sim_tps is not None
            else "predicted (closed form)",
            "tokens_per_s_closed_form": chosen.tokens_per_s,
            "tokens_per_s_simulation": sim_tps,
            "accuracy_drop": pred.to_dict(),
            "host_bytes": chosen.host_bytes,
            "host_bytes_uncompressed": int(cf.original_bytes * table.experts_per_layer
                                           * len(table.moe_layers)),
            "workload": cf.workload.source,
            "static_placement_ranked_by": cf.workload.placement_source
            or "the replayed traces themselves (an oracle)",
        },
        "accuracy_model": {"metric": req.metric, "additivity": accuracy.additivity.to_dict(),
                           "holm_alpha": accuracy.holm_alpha, "notes": accuracy.notes},
        "milp": {"tokens_per_s": milp_tps, "certified": bool(milp.certified), "gap": milp.gap,
                 "solves": milp.solves, "wall_s": milp.wall_s, "exact_for_closed_form":
                 table.separable, "accuracy_drop": accuracy.predict_sums(milp.M, milp.V).to_dict(),
                 "layers": [table.specs[c].describe() for c in milp.choice]},
        "search": search_doc,
        "candidates": candidates,
        "pareto": pareto,
        "baselines": base_docs,
        "warnings": warnings,
        "notes": notes,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
