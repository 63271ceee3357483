"""One `size="ci"` demo run shared by the planner tests that need real results (demo, report,
validation): it profiles, plans, simulates and validates the built-in model once per session."""

from __future__ import annotations

from pathlib import Path

_RUN: dict = {}


def demo_folder(tmp_path_factory) -> tuple[Path, dict, list]:
    """(folder, demo record, progress calls) of the session's ci demo, run on first use."""
    if "out" not in _RUN:
        from planner.demo import run_demo

        out = tmp_path_factory.mktemp("demo") / "report"
        calls: list = []
        record = run_demo(out, progress=lambda d, t, label: calls.append((d, t, label)), size="ci")
        _RUN.update(out=out, record=record, calls=calls)
    return _RUN["out"], _RUN["record"], _RUN["calls"]
