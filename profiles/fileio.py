"""Atomic file writes and versioned JSON documents.

Every file moesz writes goes to a temporary name in the same directory and is renamed into place, so
an interrupted run never leaves a half-written profile, policy or plan behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from profiles.errors import ConfigError, ProfileError


def _umask_mode() -> int:
    """Permissions a plain `open()` would give a new file (mkstemp's default is owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_output_file(path: str | os.PathLike, option: str = "output",
                      suffixes: tuple[str, ...] | None = None) -> Path:
    """Check, before any work, that `path` can be written as a file: not a directory, its
    parent a directory or creatable, and (with `suffixes`) one of those extensions.

    Raises:
        ConfigError: naming the option, the path and what would be right.
    """
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else path.suffix or ".json"))
        raise ConfigError(f"{option} {path} is a directory; give a file name inside it, e.g. "
                          f"{example}")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a directory; "
                                  f"choose another path")
            break
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: expected a file name ending in "
                          f"{', '.join(suffixes)}")
    return path


def check_output_dir(path: str | os.PathLike, option: str = "output directory") -> Path:
    """Check, before any work, that `path` is a directory or can be created as one.

    Raises:
        ConfigError: naming the option, the path and what would be right.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{option} {path}: {p} is a file, not a directory; give a "
                                  f"directory path")
            break
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename.

    Raises:
        ConfigError: `path` is a directory, or its parent cannot be a directory.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` to produce a file (parquet, a plot), then rename it onto `path`.

    Raises:
        ConfigError: `path` is a directory, or its parent cannot be a directory.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_versioned_json(path: str | os.PathLike, kind: str, schema_version: int) -> dict:
    """Read a JSON document and check its `kind` and `schema_version`.

    Raises:
        ProfileError: the file is missing, not JSON, of another kind or of another schema version;
            the message names the file, the field and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise ProfileError(f"{path} is a directory, not a {kind} file; give the file's path")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                           f"regenerate it with moesz") from None
    if not isinstance(doc, dict):
        raise ProfileError(f"{path}: expected a JSON object of kind '{kind}'")
    if doc.get("kind") != kind:
        raise ProfileError(f"{path}: field 'kind' is {doc.get('kind')!r}, expected {kind!r}")
    if doc.get("schema_version") != schema_version:
        raise ProfileError(
            f"{path}: field 'schema_version' is {doc.get('schema_version')!r}, expected "
            f"{schema_version}; regenerate the file with this version of moesz")
    return doc


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")
