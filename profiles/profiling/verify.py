"""Measure whole policies on a profile's own evaluation set (its profile split), for real.

The planner's additive model proposes; this module measures: each policy's experts go through
real codec round trips (`profiles.policy.apply_policy`), the model answers the profile's tasks and
benchmarks on the same prompts as the profile's unperturbed baseline (paired), and the text
metrics are measured on the same corpus half. The rows, one per task (or one `(text)` row), are
kept in the profile directory's `verified.parquet` keyed by the policy's digest, so a rerun of the
planner reuses them instead of measuring again. They are not sensitivity rows: the accuracy model
never fits on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from profiles.errors import MoeszError, ProfileError
from profiles.profiling import format as fmt
from profiles.profiling.grid import Point

VERIFIED_FILE = "verified.parquet"
Progress = Callable[[int, int, str], None]


def policy_digest(policy) -> str:
    """A stable key of a policy's storage choices (its fingerprint aside)."""
    d = policy.to_dict()
    d.pop("fingerprint", None)
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(),
                           digest_size=8).hexdigest()


def read_verified(profile_dir: str | Path) -> dict[str, list[dict]]:
    """Rows measured before, by policy digest."""
    import pandas as pd

    path = Path(profile_dir) / VERIFIED_FILE
    if not path.exists():
        return {}
    out: dict[str, list[dict]] = {}
    for r in pd.read_parquet(path).to_dict("records"):
        out.setdefault(str(r["policy_digest"]), []).append(r)
    return out


def measure_policies(profile_dir: str | Path, policies: Sequence, progress: Progress | None = None,
                     batch_size: int = 256, threads: int | None = 1) -> list[list[dict]]:
    """Rows of each policy measured on the profile's evaluation set (reused when measured before).

    Args:
        profile_dir: a model profile directory made by `profile_model` (with `baseline.json`).
        policies: `profiles.policy.Policy` objects.
        progress: `progress(done, total, label)` per policy.
        batch_size: prompts per forward pass.
        threads: torch threads while evaluating.

    Returns:
        Per policy, its rows (columns of `sensitivity.parquet` plus `policy_digest` and `policy`).

    Raises:
        ProfileError: the profile lacks its baseline, its model cannot be loaded or has another
            fingerprint, or its lm-eval tasks cannot be loaded (lm-eval missing, data changed).
    """
    from profiles.evaluation import EvalResult
    from profiles.evaluation.textmetrics import builtin_corpus, text_reference
    from profiles.evaluation.threads import torch_threads
    from profiles.models import load_model
    from profiles.policy import apply_policy
    from profiles.profiling import steps
    from profiles.profiling.metrics import profile_metrics, spec_from_record
    from profiles.profiling.sensitivity import SensitivityRunner

    d = Path(profile_dir)
    cached = read_verified(d)
    digests = [policy_digest(p) for p in policies]
    todo = [i for i, k in enumerate(digests) if k not in cached]
    if todo:
        doc = fmt.read_profile_doc(d)
        if not (d / steps.BASELINE_FILE).exists():
            raise ProfileError(f"{d / steps.BASELINE_FILE}: missing; rerun the profile command "
                               f"to complete the profile before verifying plans")
        baseline = EvalResult.load(d / steps.BASELINE_FILE)
        try:
            spec = spec_from_record(profile_metrics(doc)).with_split(doc["split"])
        except MoeszError as exc:   # its lm-eval tasks cannot be loaded here
            raise ProfileError(f"{d}: {exc}; or give --verify 0 to plan on the prediction "
                               f"alone") from None
        host_mem = doc.get("host_mem_bytes")
        with torch_threads(threads):
            try:
                loaded = load_model(doc["model"]["spec"], host_mem=host_mem,
                                    offload=host_mem is not None)
            except MoeszError as exc:
                raise ProfileError(f"{d}: its model {doc['model']['spec']!r} cannot be loaded to "
                                   f"measure the candidates ({exc}); give --verify 0 to plan on "
                                   f"the prediction alone") from None
            if loaded.fingerprint != doc["model"].get("fingerprint"):
                raise ProfileError(f"{d}: the model {doc['model']['spec']} now has fingerprint "
                                   f"{loaded.fingerprint}, the profile "
                                   f"{doc['model'].get('fingerprint')}; profile it again")
            compute = doc.get("compute_dtype", "auto")
            view = steps.compute_view(loaded, compute)
            corpus = spec.corpus(view, doc["split"]) or builtin_corpus(
                view.tokenizer, doc["split"], per_task=16, seed=int(doc.get("seed", 0)),
                model=view.model)
            runner = SensitivityRunner(loaded, baseline, text_reference(view.model, corpus), {},
                                       seed=int(doc.get("seed", 0)), batch_size=batch_size,
                                       catastrophic_drop=None,
                                       benches={b.name: b for b in spec.benches},
                                       lm_evals={t.name: t for t in spec.lm_evals})
            for done, i in enumerate(todo):
                if progress is not None:
                    progress(done, len(todo), f"verifying candidate {done + 1}/{len(todo)}")
                point = Point(f"policy:{digests[i]}", "policy",
                              tuple(doc["model"]["geometry"]["moe_layers"]), "all", "policy",
                              "none", None)
                with apply_policy(loaded, policies[i], measure_bytes=False):
                    target = steps.compute_view(loaded, compute) if view is not loaded \
                        else loaded
                    _, rows = runner.evaluate_current(point, target)
                rows = [{**r, "policy_digest": digests[i],
                         "policy": json.dumps(policies[i].to_dict(), sort_keys=True,
                                              default=str)} for r in rows]
                cached[digests[i]] = rows
            if progress is not None:
                progress(len(todo), len(todo), "verified")
        _write(d, cached)
    return [cached[k] for k in digests]


def _write(d: Path, cached: dict[str, list[dict]]) -> None:
    import pandas as pd

    frame = pd.DataFrame([r for rows in cached.values() for r in rows])
    fmt.write_table(d, VERIFIED_FILE, frame)
