"""Atomic writes and output-path checks: a bad output path is one clear error, before any work,
and nothing already on disk is touched."""

from __future__ import annotations

import json

import pytest

from profiles.errors import ConfigError, ProfileError
from profiles.fileio import (atomic_write_json, check_output_dir, check_output_file,
                             read_versioned_json)


def test_atomic_write_refuses_a_directory_and_a_file_as_parent(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="is a directory; give a file name"):
        atomic_write_json(tmp_path / "d", {"a": 1})
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        atomic_write_json(tmp_path / "f" / "x.json", {"a": 1})
    assert (tmp_path / "f").read_text() == "keep" and list((tmp_path / "d").iterdir()) == []


def test_output_checks_name_the_option(tmp_path):
    assert check_output_file(tmp_path / "new" / "x.png", "--gantt", (".png",)).name == "x.png"
    with pytest.raises(ConfigError, match=r"--gantt .*gantt\.xyz: expected a file name ending"):
        check_output_file(tmp_path / "gantt.xyz", "--gantt", (".png", ".pdf"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--plots .* is a file, not a directory"):
        check_output_dir(tmp_path / "file", "--plots")
    assert check_output_dir(tmp_path / "a" / "b", "--plots") == tmp_path / "a" / "b"


def test_read_versioned_json_errors(tmp_path):
    with pytest.raises(ProfileError, match="is a directory"):
        read_versioned_json(tmp_path, "plan", 1)
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"kind": "plan", "schema_version": 999}))
    with pytest.raises(ProfileError, match="'schema_version' is 999, expected 1"):
        read_versioned_json(p, "plan", 1)
