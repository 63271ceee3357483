"""Disk read speed for the simulator's SSD tier: reads by size and by reads in flight.

A scratch file is written (random bytes, fsync'ed) and read back at random 4 KiB-aligned offsets
with the page cache bypassed — `O_DIRECT` into page-aligned buffers, or, where the filesystem
refuses O_DIRECT (tmpfs), `posix_fadvise(DONTNEED)` before each read. Every size is read with 1,
4 and 16 reads in flight (a thread pool of positioned reads, as the runtime's disk tier reads a
layer's missing experts): NVMe drives reach their bandwidth only with several reads in flight,
so the profile keeps the whole curve (`DiskCurve`) and its best depth. The depth-1 samples are
also fitted to `latency_s + bytes / gbps` (`profiles.hardware.fit.fit_link`) for profiles and
tools that know only a line.
"""

from __future__ import annotations

import math
import mmap
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from profiles.errors import ConfigError
from profiles.hardware.fit import fit_link
from profiles.hardware.schema import DiskCurve, LinkFit


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


DEPTHS = (1, 4, 16)


def disk_read(disk_dir, file_bytes: int, read_sizes: tuple[int, ...], raw: dict,
              depths: tuple[int, ...] = DEPTHS, record_bytes: int | None = None
              ) -> tuple[LinkFit, DiskCurve]:
    """Measure reads of several sizes at several depths from a scratch file, page cache bypassed.

    Args:
        disk_dir: directory for the scratch file (default: the system temp directory).
        file_bytes: size of the scratch file (a multiple of 1 MiB).
        read_sizes: read sizes in bytes.
        raw: the profile's raw samples, extended with "host.disk_read" and "host.disk_curve".
        depths: reads in flight (a thread pool of that many positioned reads).
        record_bytes: the size of one packed expert record, measured too and used to pick the
            best depth (default: the largest read size).

    Returns:
        (the depth-1 fit `latency_s + bytes / gbps` with its fit error, the curve of aggregate
        GB/s by size and depth with its best depth), both `source` measured.

    Raises:
        ConfigError: the directory does not exist, or a read came back short.
    """
    directory = check_disk_dir(disk_dir)
    sizes = sorted(set(read_sizes) | ({int(record_bytes)} if record_bytes else set()))
    sizes = [s for s in sizes if s <= file_bytes]
    fd, path = tempfile.mkstemp(prefix=".moesz-disk-", dir=directory)
    try:
        block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        with os.fdopen(fd, "wb") as fh:
            for _ in range(file_bytes >> 20):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        method, reader = _direct_reader(path)
        rng = random.Random(0)
        nbytes, times, grid, samples = [], [], [], {}
        with ThreadPoolExecutor(max_workers=max(depths), thread_name_prefix="moesz-disk") as pool:
            for size in sizes:
                row = []
                for depth in depths:
                    # enough reads for a steady state: at least 4 per thread, at most 64 MiB
                    n = max(4 * depth, min(64, (64 << 20) // size))
                    offs = [rng.randrange(0, (file_bytes - size) // 4096 + 1) * 4096
                            for _ in range(n)]
                    if depth == 1:
                        secs = [reader(o, size) for o in offs]
                        nbytes += [size] * n
                        times += secs
                        wall = sum(secs)
                    else:
                        t0 = time.perf_counter()
                        list(pool.map(lambda o: reader(o, size), offs))
                        wall = time.perf_counter() - t0
                    row.append(n * size / wall / 1e9)
                    samples[f"{size}x{depth}"] = {"reads": n, "seconds": wall}
                grid.append(tuple(row))
        reader(0, 0)  # close
        fit = fit_link(nbytes, times)
        raw["host.disk_read"] = {"bytes": nbytes, "seconds": times, "method": method,
                                 "directory": str(directory)}
        raw["host.disk_curve"] = samples
        at = int(record_bytes) if record_bytes else sizes[-1]
        i = min(range(len(sizes)), key=lambda k: abs(math.log(sizes[k] / at)))
        top = max(grid[i])
        best = next(d for d, g in zip(depths, grid[i]) if g >= 0.95 * top)
        where = (f"random 4 KiB-aligned offsets of a {file_bytes >> 20} MiB file in {directory} "
                 f"({method})")
        link = LinkFit(latency_s=fit.latency_s, gbps=fit.gbps, source="measured",
                       fit_rel_error=fit.max_rel_error,
                       note=f"one read at a time of {_sizes_text(sizes)} at {where}; "
                            f"least-relative-error fit")
        curve = DiskCurve(tuple(sizes), tuple(depths), tuple(grid), best, method, "measured",
                          f"aggregate GB/s of {_sizes_text(sizes)} reads with "
                          f"{'/'.join(map(str, depths))} in flight (a thread pool of positioned "
                          f"reads) at {where}; best depth {best} at {at} bytes",
                          fit.max_rel_error)
        return link, curve
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _direct_reader(path: str):
    """(method, read(offset, size) -> seconds) that bypasses the page cache where it can; safe to
    call from several threads at once (each read into its own fresh page-aligned buffer)."""
    fd = None
    try:
        if not hasattr(os, "O_DIRECT"):   # macOS: no O_DIRECT flag to ask for
            raise OSError("no O_DIRECT on this platform")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        probe = mmap.mmap(-1, 4096)   # page-aligned, as O_DIRECT needs
        os.preadv(fd, [probe], 0)
        probe.close()
        method = "O_DIRECT"
    except OSError:
        if fd is not None:            # opened, but its reads refused
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        method = ("posix_fadvise(DONTNEED) before each read" if hasattr(os, "posix_fadvise")
                  else "through the page cache (no O_DIRECT nor posix_fadvise here)")
    def read(offset: int, size: int) -> float:
        if size == 0:
            os.close(fd)
            return 0.0
        if method != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        # a fresh page-aligned buffer per read, as the runtime's disk tier reads each record
        # into a new one: the kernel faults its pages in during the read, and that is timed
        # O_DIRECT reads whole pages (a record is rarely a whole number of them): the runtime
        # reads the page-aligned span around a record the same way
        span = -(-size // 4096) * 4096 if method == "O_DIRECT" else size
        buf = mmap.mmap(-1, span)
        got = os.preadv(fd, [buf], offset)
        elapsed = time.perf_counter() - t0
        buf.close()
        if got < size:
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
