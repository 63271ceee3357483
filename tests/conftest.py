"""Shared fixtures: tiny random-initialised MoE configs, the built-in model, small traces."""

from __future__ import annotations

import os

import pytest

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if torch is not None:
    # Tiny models: one thread avoids OpenMP spin-waiting, which on a shared 2-core machine made
    # evaluation 25x slower than single-threaded.
    torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch is not None and torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
