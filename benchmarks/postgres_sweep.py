"""Sweep throughput on one PostgreSQL server: points per minute with 1, 2, 4 workers, and the
storage's share of each point.

    python benchmarks/postgres_sweep.py [--workers 1,2,4] [--mode model|instant|both]
        [--limit 300] [--levels 1,2,3] [--points 200] [--out runs/pg-sweep.json]

A throwaway PostgreSQL server (`tests/profiles/pg_helpers.py`; fsync and synchronous commit left
on, as in a real deployment) is started on 127.0.0.1, one database per run, and removed at the end.

- `model`: W real `moesz profile model builtin --codecs szp --levels L --layers all --groups none
  --limit N --storage postgresql://…` processes (each with its own --out) share one sweep. The
  sweep window runs from the first trial's start to the last trial's completion (the trials'
  own timestamps, so each worker's setup — model load, ratios, baseline — is outside it);
  points per minute = points / window. Each worker reports the seconds its sweep loop spent in
  storage calls and in running points (`--json`: `sweep_storage_seconds`, `sweep_points_seconds`).
- `instant`: W library workers (`profiles.profiling.sweep.Sweep`) over `--points` points that
  each cost a few milliseconds (the szp ratio of a 64 x 64 tensor): the storage's own ceiling.

The connections each database held are sampled from `pg_stat_activity` every 0.25 s.
Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402  (benchmarks/machine.py)
from tests.profiles.pg_helpers import PostgresServer  # noqa: E402


def _instant_worker(url: str, points: int) -> None:
    """One instant-mode worker (a subprocess): run the sweep, print its stats as JSON."""
    from profiles.profiling.sweep import Sweep, open_storage
    from tests.profiles.test_profiling_sweep import compute_point

    keys = [f"level={0.01 * (i + 1):.2f}" for i in range(points)]
    compute_point(keys[0])                    # imports and first-call costs outside the sweep
    sweep = Sweep(open_storage(url, "unused.db"), "bench", {"bench": "instant"},
                  heartbeat_s=10.0, grace_s=120.0, poll_s=0.5)
    stats = sweep.run(keys, compute_point)
    print(json.dumps({"ran_now": len(stats.ran), "sweep_storage_seconds": stats.storage_s,
                      "sweep_points_seconds": stats.points_s, "calls": stats.storage_calls}))


class _Connections:
    """Samples the connections to one database while a run lasts (the maximum is kept)."""

    def __init__(self, pg: PostgresServer, database: str) -> None:
        self.pg, self.database, self.peak = pg, database, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                n = int(self.pg.sql(f"select count(*) from pg_stat_activity where datname = "
                                    f"'{self.database}'"))
            except (subprocess.SubprocessError, ValueError):
                continue
            self.peak = max(self.peak, n)

    def __enter__(self) -> "_Connections":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _window(url: str, study: str) -> tuple[int, float]:
    """(completed trials, seconds from the first trial's start to the last one's completion);
    exits when a point was completed twice."""
    import optuna

    trials = [t for t in optuna.load_study(study_name=study, storage=url).trials
              if t.state.name == "COMPLETE"]
    points = [t.user_attrs["point"] for t in trials]
    if len(points) != len(set(points)):
        raise SystemExit(f"a point was completed twice in {study}: {sorted(points)}")
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return len(trials), (end - start).total_seconds()


def run(pg: PostgresServer, mode: str, workers: int, args, work: Path) -> dict:
    db = f"{mode}{workers}"
    url = pg.create_database(db)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mode == "model":
        cmds = [[sys.executable, "-m", "planner", "profile", "model", "builtin", "--codecs", "szp",
                 "--levels", args.levels, "--layers", "all", "--groups", "none", "--limit",
                 str(args.limit), "--storage", url, "--json", "--out", str(work / db / f"w{i}")]
                for i in range(workers)]
        study = "moesz-sensitivity"
    else:
        cmds = [[sys.executable, str(Path(__file__).resolve()), "_worker", url, str(args.points)]
                for _ in range(workers)]
        study = "bench"
    t0 = time.perf_counter()
    with _Connections(pg, db) as conns:
        procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in cmds]
        outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a {mode} worker failed:\n{err}")
    summaries = [json.loads(out) for out, _ in outs]
    points, window = _window(url, study)
    ran = sum(s["ran_now"] for s in summaries)
    storage_s = sum(s["sweep_storage_seconds"] for s in summaries)
    points_s = sum(s["sweep_points_seconds"] for s in summaries)
    return {"mode": mode, "workers": workers, "points": points, "ran": ran,
            "window_s": window, "points_per_min": 60 * points / window, "wall_s": wall,
            "storage_ms_per_point": 1e3 * storage_s / ran, "points_ms_per_point": 1e3 * points_s / ran,
            "storage_share": storage_s / (storage_s + points_s),
            "peak_connections": conns.peak, "load_after": os.getloadavg()[0]}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        _instant_worker(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--mode", choices=["model", "instant", "both"], default="both")
    ap.add_argument("--limit", type=int, default=300, help="prompts per task (model mode)")
    ap.add_argument("--levels", default="1,2,3", help="szp meanabs levels (model mode)")
    ap.add_argument("--points", type=int, default=200, help="points (instant mode)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    machine = describe()
    modes = ["model", "instant"] if args.mode == "both" else [args.mode]
    rows = []
    import tempfile

    with PostgresServer(durable=True) as pg, tempfile.TemporaryDirectory() as work:
        version = pg.sql("show server_version")
        max_conn = pg.sql("show max_connections")
        for mode in modes:
            for w in (int(x) for x in args.workers.split(",")):
                row = run(pg, mode, w, args, Path(work))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"## PostgreSQL sweeps\n\n{date.today().isoformat()}, {machine}; PostgreSQL {version} "
          f"(max_connections {max_conn}, fsync on), psycopg {_version('psycopg')}, SQLAlchemy "
          f"{_version('sqlalchemy')}, optuna {_version('optuna')}.\n")
    print("| mode | workers | points | sweep window | points/min | storage ms/point | "
          "evaluating ms/point | storage share | peak connections | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['points']} | {r['window_s']:.1f} s | "
              f"{r['points_per_min']:.1f} | {r['storage_ms_per_point']:.1f} | "
              f"{r['points_ms_per_point']:.1f} | {100 * r['storage_share']:.1f} % | "
              f"{r['peak_connections']} | {r['load_after']:.1f} |")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
