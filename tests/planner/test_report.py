"""`moesz report`: markdown and a self-contained HTML page from a results folder."""

from __future__ import annotations

import base64
import json
import re

import pytest

from planner.report import find_results, render_report, to_html
from profiles.errors import MoeszError
from tests.planner.demo_folder import demo_folder

# a 1x1 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                       "hKmMIQAAAABJRU5ErkJggg==")


def test_html_embeds_local_images_and_leaves_no_file_reference(tmp_path):
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "a.png").write_bytes(PNG)
    page = to_html("# t\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![x](figs/a.png)\n", tmp_path, "t")
    assert "<table>" in page and "figs/a.png" not in page
    data = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(data) == PNG


def test_empty_or_missing_folder_refused(tmp_path):
    with pytest.raises(MoeszError, match="no moesz results"):
        render_report(tmp_path)
    with pytest.raises(MoeszError, match="no such folder"):
        render_report(tmp_path / "absent")


def test_corrupt_result_file_named(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(MoeszError, match="plan.json"):
        find_results(tmp_path)


@pytest.mark.parametrize("name, doc, message", [
    ("demo.json", {"kind": "demo_run", "schema_version": 0}, "'schema_version' is 0, expected 1"),
    ("plan.json", {"kind": "plan", "schema_version": 999}, "'schema_version' is 999"),
    ("sweep.json", {"kind": "budget_sweep", "schema_version": 1, "rows": "garbage"},
     "field 'rows' must be a list of simulated runs"),
    ("sweep.json", {"kind": "budget_sweep", "schema_version": 1, "rows": [
        {"policy": "plan", "cache": "lru", "gpu_mem": "25%", "host_mem": "unlimited",
         "tokens_per_s": 1.0}]}, "every SimResult field"),
    ("validation.json", {"kind": "plan", "schema_version": 1}, "field 'kind' is 'plan'"),
])
def test_result_files_of_another_version_or_shape_are_refused(tmp_path, name, doc, message):
    (tmp_path / name).write_text(json.dumps(doc))
    with pytest.raises(MoeszError, match=message):
        render_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_a_plan_with_a_malformed_field_is_refused(tmp_path):
    """A plan whose fields are there but malformed ('layers' not a list) is named, not rendered."""
    from planner.pipeline import PlanRequest, make_plan
    from profiles.serving import ServingConfig
    from tests.planner.planner_fixtures import tiny_profile

    prof = tiny_profile(tmp_path / "prof")
    make_plan(PlanRequest(profile=str(prof), hardware="preset:h200-published", budget=0.01,
                          serving=ServingConfig(gpu_mem_fraction=0.25, generated_tokens=16),
                          trials=5, warm_trials=0, rerank=0), out=str(tmp_path / "r" / "plan.json"))
    doc = json.loads((tmp_path / "r" / "plan.json").read_text())
    (tmp_path / "r" / "plan.json").write_text(json.dumps({**doc, "layers": "x"}))
    with pytest.raises(MoeszError, match="field 'layers' must be a list"):
        render_report(tmp_path / "r")


@pytest.mark.slow
def test_report_renders_from_a_demo_folder(tmp_path_factory):
    out, _, _ = demo_folder(tmp_path_factory)
    md_path, html_path = render_report(out)
    md = md_path.read_text()
    for heading in ("## Predicted against measured", "## Validation per task (measured)",
                    "## The plan (predicted)", "## Memory-budget sweep (predicted)",
                    "## Model profile (measured)", "## Files in this folder"):
        assert heading in md, heading
    # every figure the markdown references exists, and each required figure is there
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for ref in refs:
        assert (out / ref).is_file(), ref
    alts = re.findall(r"!\[([^\]]*)\]", md)
    for alt in ("sensitivity heatmap", "ratio curves", "Pareto front", "memory-budget curves",
                "level per layer"):
        assert alt in alts, alt
    # the predicted-vs-measured table carries the validation's own numbers
    val = json.loads((out / "validation.json").read_text())
    assert f"**{val['verdict']}**" in md
    # every file of the folder is listed
    for name in ("plan.json", "sweep.json", "timeline.json", "profile/traces.parquet"):
        assert f"`{name}`" in md
    # the HTML page stands alone: images inline, no relative image paths left
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == len(refs)
    assert not re.search(r'src="(?!data:)[^"]+"', page)
