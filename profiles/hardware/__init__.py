"""Hardware profiles: the schema, loading (files and `preset:NAME`) and saving.

`load_hardware("preset:h200-published")` or `load_hardware("hw.json")` returns a frozen
`HardwareProfile`; see `docs/hardware-profile.md` for the JSON layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from profiles.errors import ProfileError
from profiles.fileio import atomic_write_json, read_versioned_json
from profiles.hardware.parse import profile_from_dict, profile_to_dict
from profiles.hardware.schema import (
    KIND, SCHEMA_VERSION, SOURCES, AttentionTimings, BatchTimings, CodecSpeed, CpuExpertFFN,
    DiskCurve, Figure, GpuProfile, HardwareProfile, HostProfile, LevelCurve, LinkFit, ModelTimings,
    ProfileSource, ThreadScaling, TokenCurve)

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped hardware presets (usable as `preset:NAME`)."""
    names = []
    for p in sorted(PRESET_DIR.glob("*.json")):
        try:
            if json.loads(p.read_text()).get("kind") == KIND:
                names.append(p.stem)
        except (OSError, json.JSONDecodeError):
            continue
    return names


def load_hardware(spec: str | os.PathLike) -> HardwareProfile:
    """Load a hardware profile from `preset:NAME` or a JSON file.

    Raises:
        ProfileError: unknown preset (the message lists the shipped ones), missing file, wrong
            kind or schema version, or an invalid field (named with its path).
    """
    text = str(spec)
    if text.startswith("preset:"):
        name = text[len("preset:"):]
        path = PRESET_DIR / f"{name}.json"
        if not path.exists() or name not in list_presets():
            raise ProfileError(f"hardware preset {name!r} does not exist; shipped presets: "
                               f"{', '.join('preset:' + n for n in list_presets()) or 'none'}")
        doc = read_versioned_json(path, KIND, SCHEMA_VERSION)
        return profile_from_dict(doc, text)
    doc = read_versioned_json(text, KIND, SCHEMA_VERSION)
    return profile_from_dict(doc, text)


def save_hardware(profile: HardwareProfile, path: str | os.PathLike) -> None:
    """Write a profile atomically as JSON (validated by reading it back first)."""
    doc = profile_to_dict(profile)
    profile_from_dict(doc, str(path))
    atomic_write_json(path, doc)


__all__ = [
    "KIND", "SCHEMA_VERSION", "SOURCES", "AttentionTimings", "BatchTimings", "CodecSpeed",
    "CpuExpertFFN", "DiskCurve", "ThreadScaling", "Figure", "GpuProfile", "HardwareProfile", "HostProfile", "LevelCurve", "LinkFit",
    "ModelTimings", "ProfileError", "ProfileSource", "TokenCurve", "list_presets",
    "load_hardware", "profile_from_dict", "profile_to_dict", "save_hardware",
]
