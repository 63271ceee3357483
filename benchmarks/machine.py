"""The machine line every benchmark prints beside its figures (CPU model, cores, load, Python)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """'CPU model, N cores, load average L at start, Python X.Y.Z'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at start, "
            f"Python {platform.python_version()}")
