"""The sweep on a real Optuna storage: claims, resume, two workers, a killed worker, identity.

The points here are real but cheap computations (the szp ratio of a seeded tensor at a level), so
the coordination is tested with real worker processes in seconds; the sensitivity sweep of a real
model runs in tests/profiles/test_profiling_model.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from profiles.errors import ConfigError, ProfileError
from profiles.profiling.sweep import Sweep, open_storage

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"level={lv}" for lv in (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0)]
MANY = [f"level={0.05 * (i + 1):.2f}" for i in range(24)]


def compute_point(key: str, log: str | None = None, delay: float = 0.0) -> tuple[float, list[dict]]:
    """A real point: the szp ratio of a seeded Gaussian bf16 tensor at the key's meanabs level.
    Each start and finish is appended to `log` (one line, atomic for short writes)."""
    from profiles.codecs import encode
    from profiles.codecs.sources import random_tensor

    if log:
        with open(log, "a") as fh:
            fh.write(f"start {key} {os.getpid()}\n")
    time.sleep(delay)
    level = float(key.split("=")[1])
    blob = encode(random_tensor("gaussian", (64, 64), "bf16", seed=1), "szp", "meanabs", level)
    if log:
        with open(log, "a") as fh:
            fh.write(f"finish {key} {os.getpid()}\n")
    return blob.ratio, [{"key": key, "ratio": blob.ratio, "pid": os.getpid()}]


def worker_main(url: str, log: str, delay: float, grace: float, many: bool = False) -> None:
    """Entry point of a worker process (run with `python -c`)."""
    sweep = Sweep(open_storage(url, "unused.db"), "t", {"grid": "test"}, heartbeat_s=0.3,
                  grace_s=grace, poll_s=0.1)
    stats = sweep.run(MANY if many else KEYS, lambda k: compute_point(k, log, delay))
    print(f"RAN {len(stats.ran)} COMPLETE {stats.complete}")


def _spawn(url: str, log: Path, delay: float, grace: float = 2.0,
           many: bool = False) -> subprocess.Popen:
    code = (f"from tests.profiles.test_profiling_sweep import worker_main; "
            f"worker_main({url!r}, {str(log)!r}, {delay}, {grace}, {many})")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(log: Path) -> Counter:
    return Counter(tuple(line.split()[:2]) for line in log.read_text().splitlines())


def test_resume_runs_only_missing_points(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    log = tmp_path / "log"
    first = Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"})
    stats = first.run(KEYS, lambda k: compute_point(k, str(log)), max_evals=3)
    assert len(stats.ran) == 3 and not stats.complete
    again = Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"})
    stats = again.run(KEYS, lambda k: compute_point(k, str(log)))
    assert stats.complete and len(stats.ran) == len(KEYS) - 3
    starts = _events(log)
    assert all(starts[("start", k)] == 1 for k in KEYS)
    done = again.completed()
    assert set(done) == set(KEYS) and done["level=1.0"][0]["ratio"] > 1
    # a third run finds nothing to do
    assert Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"}).run(
        KEYS, lambda k: pytest.fail("nothing should run")).ran == ()


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_share_a_sweep_without_repeats(tmp_path, kind):
    """Three workers racing for 24 instant points on a fresh storage: every point runs once.
    (Without BEGIN IMMEDIATE on SQLite, two workers could both claim one WAITING trial.)"""
    url = f"sqlite:///{tmp_path / 'sweep.db'}" if kind == "sqlite" else \
        f"journal:{tmp_path / 'sweep.journal'}"
    log = tmp_path / "log"
    # a long grace period: under load a heartbeat can be late, and a point taken for dead would
    # (rightly) run again — that case is the killed-worker test's
    procs = [_spawn(url, log, delay=0.0, grace=120.0, many=True) for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "COMPLETE True" in out
    ev = _events(log)
    for k in MANY:
        assert ev[("start", k)] == 1 and ev[("finish", k)] == 1, (k, ev)
    ran = [int(o.split()[1]) for o, _ in outs]
    assert sum(ran) == len(MANY)
    assert set(Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"}).completed()) \
        == set(MANY)


def test_killed_worker_point_is_retried_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    log = tmp_path / "log"
    victim = _spawn(url, log, delay=60.0)         # would sit in its first point for a minute
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.1)
    assert log.exists(), victim.communicate()[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_key = log.read_text().split()[1]
    survivor = _spawn(url, log, delay=0.0, grace=1.5)
    out, err = survivor.communicate(timeout=240)
    assert survivor.returncode == 0, err
    ev = _events(log)
    assert ev[("start", killed_key)] == 2 and ev[("finish", killed_key)] == 1
    for k in KEYS:
        assert ev[("finish", k)] == 1
        if k != killed_key:
            assert ev[("start", k)] == 1
    import optuna

    trials = optuna.load_study(study_name="t", storage=url).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["point"] == killed_key
    assert "no heartbeat" in failed[0].user_attrs["failed_reason"]


def test_duplicate_enqueues_run_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    sweep = Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"})
    sweep.ensure(KEYS)
    for k in KEYS[:2]:            # a second worker that enqueued the same points at the same time
        sweep.study.enqueue_trial({}, user_attrs={"point": k})
    calls = Counter()

    def run(k):
        calls[k] += 1
        return compute_point(k)

    stats = sweep.run(KEYS, run)
    assert stats.complete and all(v == 1 for v in calls.values()) and len(calls) == len(KEYS)
    assert stats.skipped_duplicates == 2


def test_a_failing_point_is_marked_and_retried_on_rerun(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"

    def boom(k):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"}).run(KEYS[:1], boom)
    stats = Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"}).run(
        KEYS[:1], compute_point)
    assert stats.complete and stats.ran == (KEYS[0],)


def test_other_settings_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    Sweep(open_storage(url, tmp_path / "x.db"), "t", {"fingerprint": "a", "limit": 8})
    with pytest.raises(ProfileError, match="limit=8.*this run has 9"):
        Sweep(open_storage(url, tmp_path / "x.db"), "t", {"fingerprint": "a", "limit": 9})


def test_storage_urls(tmp_path):
    from optuna.storages import JournalStorage, RDBStorage

    assert isinstance(open_storage(None, tmp_path / "d" / "s.db"), RDBStorage)
    assert isinstance(open_storage(str(tmp_path / "s.sqlite"), "x"), RDBStorage)
    assert isinstance(open_storage(str(tmp_path / "s.log"), "x"), JournalStorage)
    with pytest.raises(ConfigError, match="not a URL"):
        open_storage("somewhere", "x")
    with pytest.raises(ConfigError, match="cannot be opened"):
        open_storage("nosuchdb://host/db", "x")
    with pytest.raises(ConfigError, match="grace period"):
        Sweep(open_storage(None, tmp_path / "g.db"), "t", {}, heartbeat_s=5, grace_s=6)


def test_points_run_in_grid_order_whatever_the_enqueue_order(tmp_path):
    """`ensure` enqueues chunks in a random order (workers that start together then enqueue
    different chunks); claims still follow the grid's order."""
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    sweep = Sweep(open_storage(url, tmp_path / "x.db"), "t", {"grid": "test"})
    for k in reversed(MANY):                     # another worker enqueued them backwards
        sweep.study.enqueue_trial({}, user_attrs={"point": k})
    stats = sweep.run(MANY, compute_point, max_evals=3)
    assert stats.ran == tuple(MANY[:3]) and stats.skipped_duplicates == 0
