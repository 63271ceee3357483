"""Plan files: the versioned JSON document `moesz plan` writes and later commands read.

A plan (`kind: "plan"`, schema version 1) holds the `Policy` (with the model fingerprint) under
the key `policy`, so `Policy.load(plan.json)` reads it like a policy file; the `ServingConfig`; the
hardware profile's source and the SHA-256 of its content; the budget; each layer's choice; the
predictions (closed form and simulation) with the accuracy drop as an interval; the host memory
of the stored experts; the baselines; the MILP optimum and the search's gap to it; the command.
The full field list is in docs/planning.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiles.errors import MoeszError, PlanError
from profiles.fileio import atomic_write_json, read_versioned_json
from profiles.policy import PLAN_KIND, PLAN_SCHEMA_VERSION, Policy
from profiles.serving import ServingConfig

KIND, SCHEMA_VERSION = PLAN_KIND, PLAN_SCHEMA_VERSION  # defined with the policy it embeds
REQUIRED = ("model", "policy", "serving", "hardware", "budget", "layers", "predicted", "baselines")


@dataclass(frozen=True)
class Plan:
    """A plan file, read and checked.

    Attributes:
        doc: the JSON document.
        policy: the planned `Policy` (carries the fingerprint).
        serving: the `ServingConfig` it was planned for.
        path: where it was read from (None when built in memory).
    """

    doc: dict
    policy: Policy
    serving: ServingConfig
    path: Path | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.doc["model"].get("fingerprint")

    @property
    def budget(self) -> dict:
        return self.doc["budget"]

    @property
    def predicted(self) -> dict:
        return self.doc["predicted"]

    def check_model(self, fingerprint: str | None) -> None:
        """Refuse to apply this plan to a model with another fingerprint.

        Raises:
            PlanError: the fingerprints differ.
        """
        from profiles.models.fingerprint import fingerprint_mismatch

        reason = fingerprint_mismatch(self.fingerprint, fingerprint, str(self.path or "the plan"))
        if reason:
            raise PlanError(f"{reason}; make a plan for this model (moesz plan --profile DIR from "
                            f"a profile of it)")


def hardware_source(spec: str) -> dict:
    """The hardware profile's source (path or `preset:NAME`) and the SHA-256 of its bytes."""
    from profiles.hardware import PRESET_DIR

    text = str(spec)
    if text.startswith("preset:"):
        path = PRESET_DIR / f"{text[len('preset:'):]}.json"
    else:
        path = Path(text)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"source": text, "sha256": digest}


def plan_from_dict(doc: Any, where: str = "plan") -> Plan:
    """Check a plan document and build a `Plan`.

    Raises:
        PlanError: a required field is missing or malformed (named in the message).
    """
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a JSON object of kind {KIND!r}")
    if doc.get("kind") != KIND:
        raise PlanError(f"{where}: field 'kind' is {doc.get('kind')!r}, expected {KIND!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise PlanError(f"{where}: field 'schema_version' is {doc.get('schema_version')!r}, "
                        f"expected {SCHEMA_VERSION}; make the plan again with this moesz")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise PlanError(f"{where}: missing field(s) {', '.join(missing)}; a plan written by "
                        f"`moesz plan` has {', '.join(REQUIRED)}")
    if not isinstance(doc["model"], dict):
        raise PlanError(f"{where}: field 'model' must be an object with 'fingerprint'")
    if not isinstance(doc["layers"], list):
        raise PlanError(f"{where}: field 'layers' must be a list of per-layer choices")
    acc = (doc["predicted"] or {}).get("accuracy_drop") if isinstance(doc["predicted"], dict) \
        else None
    if not isinstance(acc, dict) or not {"value", "low", "high"} <= set(acc):
        raise PlanError(f"{where}: field 'predicted.accuracy_drop' must be an interval "
                        f"{{value, low, high}}")
    try:
        policy = Policy.from_dict(doc["policy"], f"{where} field 'policy'")
        serving = ServingConfig.from_dict(doc["serving"])
    except PlanError:
        raise
    except MoeszError as exc:
        raise PlanError(f"{where}: {exc}") from None
    if policy.fingerprint != doc["model"].get("fingerprint"):
        raise PlanError(f"{where}: the policy's fingerprint {policy.fingerprint} differs from "
                        f"model.fingerprint {doc['model'].get('fingerprint')}; the file was edited")
    return Plan(doc, policy, serving)


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file.

    Raises:
        PlanError: missing file, not JSON, another kind or schema version, or a bad field.
    """
    path = Path(path)
    try:
        doc = read_versioned_json(path, KIND, SCHEMA_VERSION)
    except MoeszError as exc:
        raise PlanError(str(exc)) from None
    plan = plan_from_dict(doc, str(path))
    return Plan(plan.doc, plan.policy, plan.serving, path)


def save_plan(doc: dict, path: str | Path) -> Plan:
    """Check a plan document and write it atomically; returns the `Plan`."""
    plan = plan_from_dict(doc, str(path))
    atomic_write_json(path, doc)
    return Plan(plan.doc, plan.policy, plan.serving, Path(path))
