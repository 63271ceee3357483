"""Disk read speed for the simulator's SSD tier: reads of several sizes, fitted to a line.

A scratch file is written (random bytes, fsync'ed) and read back at random 4 KiB-aligned offsets
with the page cache bypassed — `O_DIRECT` into a page-aligned buffer, or, where the filesystem
refuses O_DIRECT (tmpfs), `posix_fadvise(DONTNEED)` before each read — and the times are fitted
to `latency_s + bytes / gbps` (`profiles.hardware.fit.fit_link`).
"""

from __future__ import annotations

import mmap
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from profiles.errors import ConfigError
from profiles.hardware.fit import fit_link
from profiles.hardware.schema import LinkFit


def check_disk_dir(disk_dir) -> Path:
    """The directory for the disk-read scratch file (None: the system temp directory).

    Raises:
        ConfigError: it does not exist or is a file.
    """
    directory = Path(disk_dir) if disk_dir is not None else Path(tempfile.gettempdir())
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise ConfigError(f"--disk-dir {directory} {what}; give an existing directory on the drive "
                          f"that will hold offloaded experts")
    return directory


def disk_read(disk_dir, file_bytes: int, read_sizes: tuple[int, ...], raw: dict) -> LinkFit:
    """Fit reads of several sizes from a scratch file with the page cache bypassed.

    Args:
        disk_dir: directory for the scratch file (default: the system temp directory).
        file_bytes: size of the scratch file (a multiple of 1 MiB).
        read_sizes: read sizes in bytes; small ones are read 5 times, larger ones 3 times.
        raw: the profile's raw samples, extended with "host.disk_read".

    Returns:
        The fitted `latency_s + bytes / gbps` link, `source` measured, with its fit error.

    Raises:
        ConfigError: the directory does not exist, or a read came back short.
    """
    directory = check_disk_dir(disk_dir)
    fd, path = tempfile.mkstemp(prefix=".moesz-disk-", dir=directory)
    try:
        block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        with os.fdopen(fd, "wb") as fh:
            for _ in range(file_bytes >> 20):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        method, reader = _direct_reader(path, max(read_sizes))
        rng = random.Random(0)
        nbytes, times = [], []
        for size in read_sizes:
            reps = 5 if size <= (1 << 20) else 3
            for _ in range(reps):
                offset = rng.randrange(0, (file_bytes - size) // 4096 + 1) * 4096
                nbytes.append(size)
                times.append(reader(offset, size))
        reader(0, 0)  # close
        fit = fit_link(nbytes, times)
        raw["host.disk_read"] = {"bytes": nbytes, "seconds": times, "method": method,
                                 "directory": str(directory)}
        return LinkFit(latency_s=fit.latency_s, gbps=fit.gbps, source="measured",
                       fit_rel_error=fit.max_rel_error,
                       note=f"reads of {_sizes_text(read_sizes)} at random offsets of a "
                            f"{file_bytes >> 20} MiB file in {directory} ({method}); "
                            f"least-relative-error fit")
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _direct_reader(path: str, biggest: int):
    """(method, read(offset, size) -> seconds) that bypasses the page cache where it can."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, biggest)   # page-aligned, as O_DIRECT needs
        os.preadv(fd, [memoryview(buf)[:4096]], 0)
        method = "O_DIRECT"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        buf = mmap.mmap(-1, biggest)
        method = "posix_fadvise(DONTNEED) before each read"

    def read(offset: int, size: int) -> float:
        if size == 0:
            os.close(fd)
            buf.close()
            return 0.0
        if method != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        view = memoryview(buf)[:size]
        t0 = time.perf_counter()
        got = os.preadv(fd, [view], offset)
        elapsed = time.perf_counter() - t0
        view.release()
        if got != size:
            raise ConfigError(f"{path}: short read of {got} of {size} bytes while measuring the disk")
        return elapsed

    return method, read


def _sizes_text(sizes) -> str:
    def one(n: int) -> str:
        for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= s:
                return f"{n // s} {unit}"
        return f"{n} B"

    return f"{one(min(sizes))} ... {one(max(sizes))}"
