"""The sweep on a real PostgreSQL server that the tests start themselves (`pytest -k postgres`).

A throwaway server (`tests/profiles/pg_helpers.py`: initdb in a temporary directory, a free port
of 127.0.0.1, stopped and removed at the end) holds one database per test. Workers are real
processes racing for cheap real points (as in test_profiling_sweep.py) with a short heartbeat and
grace; the last two tests run two real `moesz profile model` workers on the built-in model.
Skipped only when no PostgreSQL binaries are installed.
"""

from __future__ import annotations

import itertools
import json
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
from tests.profiles.pg_helpers import PostgresServer, postgres_bin
from tests.profiles.test_profiling_sweep import MANY, compute_point

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="no PostgreSQL binaries (initdb, "
                                "pg_ctl) found; install PostgreSQL to run the postgres tests")
_names = itertools.count()


@pytest.fixture(scope="module")
def pg():
    """One PostgreSQL server for the module; stopped and removed whatever happens."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def url(pg):
    """A fresh database on the module's server (restarted first if a test left it stopped)."""
    if not pg.running:
        pg.restart()
    return pg.create_database(f"sweep{next(_names)}")


def worker_main(url: str, log: str, go: str, delay: float, grace: float,
                reconnect: float | None = None) -> None:
    """A worker process: open the storage, wait for the `go` file, run the sweep over MANY.
    A `MoeszError` is printed as the CLI prints it: one line, exit code 1."""
    from profiles.codecs import encode  # noqa: F401  (imported before the start, not during)
    from profiles.errors import MoeszError

    try:
        sweep = Sweep(open_storage(url, "unused.db"), "t", {"grid": "test"}, heartbeat_s=0.3,
                      grace_s=grace, poll_s=0.1, reconnect_s=reconnect)
        with open(log, "a") as fh:
            fh.write(f"ready {os.getpid()}\n")
        while not os.path.exists(go):
            time.sleep(0.02)
        stats = sweep.run(MANY, lambda k: compute_point(k, log, delay))
    except MoeszError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"ran": len(stats.ran), "complete": stats.complete,
                      "outages": stats.outages, "stale_failed": stats.stale_failed}))


def _spawn(url: str, tmp: Path, delay: float, grace: float = 30.0,
           reconnect: float | None = None) -> subprocess.Popen:
    code = (f"from tests.profiles.test_profiling_postgres import worker_main; "
            f"worker_main({url!r}, {str(tmp / 'log')!r}, {str(tmp / 'go')!r}, {delay}, {grace}, "
            f"{reconnect})")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(tmp: Path) -> list[list[str]]:
    log = tmp / "log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _wait_for(tmp: Path, what: str, count: int, procs, timeout: float = 120.0) -> None:
    """Wait until the log holds `count` lines starting with `what` (failing if a worker died)."""
    deadline = time.time() + timeout
    while sum(1 for w in _lines(tmp) if w[0] == what) < count:
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                pytest.fail(f"a worker exited with {p.returncode}: {p.communicate()[1]}")
        assert time.time() < deadline, f"timed out waiting for {count} {what!r} lines"
        time.sleep(0.05)


def _go(tmp: Path, procs) -> None:
    _wait_for(tmp, "ready", len(procs), procs)
    (tmp / "go").touch()


def _finish(procs, timeout: float = 240.0) -> list[tuple[int, str, str]]:
    """Wait for the workers: (exit code, stdout, stderr) of each."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _events(tmp: Path) -> Counter:
    return Counter((w[0], w[1]) for w in _lines(tmp) if w[0] in ("start", "finish"))


def _trials(url: str):
    import optuna

    return optuna.load_study(study_name="t", storage=url).trials


def _completed_once(url: str, keys) -> None:
    done = [t.user_attrs["point"] for t in _trials(url) if t.state.name == "COMPLETE"]
    assert sorted(done) == sorted(keys), Counter(done).most_common(3)


def test_postgres_two_workers_complete_every_point_once(url, tmp_path):
    procs = [_spawn(url, tmp_path, delay=0.1) for _ in range(2)]
    _go(tmp_path, procs)
    results = _finish(procs)
    for rc, out, err in results:
        assert rc == 0, err
        assert json.loads(out)["complete"]
    ran = [json.loads(out)["ran"] for _, out, _ in results]
    assert sum(ran) == len(MANY) and min(ran) >= 1, ran      # both workers took points
    ev = _events(tmp_path)
    for k in MANY:
        assert ev[("start", k)] == 1 and ev[("finish", k)] == 1, (k, ev)
    _completed_once(url, MANY)
    states = Counter(t.state.name for t in _trials(url))
    assert not {"FAIL", "RUNNING", "WAITING"} & set(states), states   # PRUNED: duplicate enqueues


def test_postgres_killed_worker_point_is_failed_by_heartbeat_and_retried_once(url, tmp_path):
    """A worker killed with SIGKILL mid-point while another runs: the other fails its point once
    the heartbeat is 1.5 s old and runs it again, once."""
    victim = _spawn(url, tmp_path, delay=60.0, grace=1.5)     # sits in its first point
    survivor = _spawn(url, tmp_path, delay=0.05, grace=1.5)
    _go(tmp_path, [victim, survivor])
    deadline = time.time() + 60
    while not any(w[0] == "start" and w[2] == str(victim.pid) for w in _lines(tmp_path)):
        assert time.time() < deadline and victim.poll() is None, victim.communicate()[1]
        time.sleep(0.02)
    killed_key = next(w[1] for w in _lines(tmp_path) if w[0] == "start" and w[2] == str(victim.pid))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (rc, out, err), = _finish([survivor])
    assert rc == 0, err
    assert json.loads(out)["complete"] and json.loads(out)["stale_failed"] == 1
    ev = _events(tmp_path)
    assert ev[("start", killed_key)] == 2 and ev[("finish", killed_key)] == 1
    for k in MANY:
        assert ev[("finish", k)] == 1
        if k != killed_key:
            assert ev[("start", k)] == 1
    failed = [t for t in _trials(url) if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["point"] == killed_key
    assert "no heartbeat" in failed[0].user_attrs["failed_reason"]
    _completed_once(url, MANY)


def test_postgres_mismatched_sweep_is_refused(url):
    Sweep(open_storage(url, "x"), "t", {"fingerprint": "a", "prompts_per_task": 8})
    with pytest.raises(ProfileError, match=r"made with prompts_per_task=8, this run has 9; use "
                                           r"another --out or --storage"):
        Sweep(open_storage(url, "x"), "t", {"fingerprint": "a", "prompts_per_task": 9})


def test_postgres_database_restart_mid_sweep_workers_reconnect(pg, url, tmp_path):
    """The server is stopped (fast: sessions terminated) for 1.5 s mid-sweep and started again:
    both workers retry through the outage and finish; no point is lost or completed twice."""
    procs = [_spawn(url, tmp_path, delay=0.15) for _ in range(2)]
    _go(tmp_path, procs)
    _wait_for(tmp_path, "finish", 6, procs)
    pg.stop("fast")
    time.sleep(1.5)
    pg.restart()
    results = _finish(procs)
    for rc, out, err in results:
        assert rc == 0, err
        assert json.loads(out)["complete"]
        assert json.loads(out)["outages"] >= 1        # the restart did reach this worker
    ev = _events(tmp_path)
    assert all(ev[("finish", k)] >= 1 for k in MANY)
    _completed_once(url, MANY)
    assert not [t for t in _trials(url) if t.state.name in ("FAIL", "RUNNING", "WAITING")]


def test_postgres_long_outage_exits_in_one_line_and_rerun_resumes(pg, url, tmp_path):
    """The server stays down longer than the worker's patience (2 s): the worker stops with one
    line; after the server is back, rerunning finishes the sweep with nothing lost."""
    worker = _spawn(url, tmp_path, delay=0.15, grace=1.5, reconnect=2.0)
    _go(tmp_path, [worker])
    _wait_for(tmp_path, "finish", 4, [worker])
    pg.stop("fast")
    try:
        (rc, out, err), = _finish([worker], timeout=60)
    finally:
        pg.restart()
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: the sweep storage {url} has not answered for 2 s (") and \
        "rerun the same command to resume" in err
    done_before = {t.user_attrs["point"] for t in _trials(url) if t.state.name == "COMPLETE"}
    assert 4 <= len(done_before) < len(MANY)
    rerun = _spawn(url, tmp_path, delay=0.0, grace=1.5)
    (tmp_path / "go").touch()
    (rc, out, err), = _finish([rerun])
    assert rc == 0, err
    assert json.loads(out)["complete"]
    _completed_once(url, MANY)
    ev = _events(tmp_path)
    assert all(ev[("start", k)] == 1 for k in done_before)   # completed points are not redone


def test_postgres_missing_driver_names_the_package(monkeypatch, pg):
    """`postgresql://` needs psycopg 3 (SQLAlchemy >= 2.1); `+psycopg2` needs psycopg2."""
    monkeypatch.setitem(sys.modules, "psycopg", None)       # as if it were not installed
    with pytest.raises(ConfigError) as info:
        open_storage("postgresql://moesz:secret@127.0.0.1:1/db", "x")
    msg = str(info.value)
    assert "\n" not in msg and "secret" not in msg
    assert "database driver psycopg is not installed" in msg and 'psycopg[binary]' in msg
    assert "moesz[postgres]" in msg and "postgresql+psycopg2://" in msg
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ConfigError, match="driver psycopg2 is not installed; pip install "
                                          "psycopg2-binary"):
        open_storage(f"postgresql+psycopg2://moesz@127.0.0.1:{pg.port}/db", "x")


def test_postgres_unreachable_server_and_passwords_are_not_shown(pg):
    with pytest.raises(ConfigError) as info:
        open_storage(f"postgresql://moesz:secret@127.0.0.1:{pg.port}/nosuchdb", "x")
    msg = str(info.value)
    assert "\n" not in msg and "secret" not in msg and "moesz:***@" in msg
    assert "cannot be opened" in msg and "nosuchdb" in msg


# --- two real `moesz profile model` workers -----------------------------------------------------

def _builtin_ready() -> bool:
    from profiles.builtin import FILES, builtin_dir

    return all((builtin_dir() / f).exists() for f in FILES)


PROFILE_ARGS = ["profile", "model", "builtin", "--codecs", "szp", "--levels", "1,3", "--layers",
                "3", "--groups", "none", "--limit", "8"]


def _moesz(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "planner", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def profiled(pg, tmp_path_factory):
    """Two `moesz profile model` workers, each with its own --out, on one PostgreSQL database."""
    if not _builtin_ready():
        pytest.skip("the built-in model's weights are not built yet (python -m "
                    "profiles.builtin.train)")
    if not pg.running:
        pg.restart()
    # trust authentication takes any password: the URL has one, to check it is never shown
    url = pg.create_database("profile").replace("moesz@", "moesz:secret@")
    tmp = tmp_path_factory.mktemp("pgprof")
    procs = [_moesz(*PROFILE_ARGS, "--storage", url, "--json", "--out", str(tmp / f"w{i}"))
             for i in range(2)]
    return url, tmp, _finish(procs, timeout=600)


def test_postgres_profile_workers_write_identical_sensitivity(profiled):
    import optuna
    import pandas as pd

    url, tmp, results = profiled
    for rc, _, err in results:
        assert rc == 0, err
    summaries = [json.loads(out) for _, out, _ in results]
    assert all(s["complete"] for s in summaries)
    total = summaries[0]["points_total"]
    assert total == 5 and sum(s["ran_now"] for s in summaries) == total   # szp x 2 + 3 baselines
    assert all(s["sweep_storage_seconds"] > 0 for s in summaries)
    trials = optuna.load_study(study_name="moesz-sensitivity", storage=url).trials
    done = [t.user_attrs["point"] for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == len(set(done)) == total
    a, b = (pd.read_parquet(tmp / f"w{i}" / "sensitivity.parquet") for i in range(2))
    assert len(a) == total * 4
    pd.testing.assert_frame_equal(a, b)
    assert (tmp / "w0" / "sensitivity.parquet").read_bytes() == \
        (tmp / "w1" / "sensitivity.parquet").read_bytes()
    assert json.loads((tmp / "w0" / "profile.json").read_text())["storage"] == \
        url.replace(":secret@", ":***@")


def test_postgres_mismatched_profile_is_refused_in_one_line(profiled):
    url, tmp, _ = profiled
    args = [a if a != "8" else "9" for a in PROFILE_ARGS]
    p = _moesz(*args, "--storage", url, "--out", str(tmp / "other"))
    rc, out, err = _finish([p])[0]
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("error: sweep storage holds study 'moesz-sensitivity' made with "
                          "prompts_per_task=8, this run has 9; use another --out or --storage")
    assert "secret" not in err and not (tmp / "other" / "profile.json").exists()
