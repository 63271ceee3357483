"""A sweep over grid points as an Optuna study that many workers can share without repeats.

Each point of the grid (a target x codec x level ...) is one enqueued Optuna trial carrying the
point's key in its user attributes; its result rows are stored in the trial when it completes, so
the storage itself is the record of the sweep and any worker can write the output files from it.

Optuna's `GridSampler` alone can hand the same point to two workers, and a worker that dies leaves
its trial RUNNING forever. Here instead:

- **claim before run**: a worker takes a point only by moving its WAITING trial to RUNNING, which
  the storage does atomically (a row lock in RDB storages, the ordered log in a journal); a
  worker that loses the race moves on to the next point;
- **duplicates are harmless**: workers that start together may enqueue a point twice; on claiming,
  a trial yields (state PRUNED, `duplicate_of`) to any COMPLETE trial of its point and to any
  earlier-numbered one still WAITING or RUNNING, so one copy runs;
- **heartbeats**: a thread stamps the running trial every `heartbeat_s` seconds (a trial system
  attribute, so it works for SQLite, PostgreSQL, MySQL and journal files alike);
- **stale trials are retried**: a RUNNING trial whose last heartbeat is older than `grace_s` is
  moved to FAIL (only one worker can win that transition) and its point is enqueued again;
- **resume**: rerunning enqueues only points without a COMPLETE trial.

Heartbeats use the workers' wall clocks: on several machines keep them in sync (NTP) and keep
`grace_s` well above the clock skew.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from profiles.errors import ConfigError, ProfileError

POINT_ATTR = "point"
ROWS_ATTR = "rows"
HEARTBEAT_ATTR = "moesz_heartbeat"
IDENTITY_ATTR = "moesz_identity"
Progress = Callable[[int, int, str], None]
RunPoint = Callable[[str], tuple[float, list[dict]]]


@dataclass(frozen=True)
class SweepStats:
    """What one worker did: points it ran, duplicates it skipped, stale trials it failed."""

    ran: tuple[str, ...]
    skipped_duplicates: int
    stale_failed: int
    completed_total: int
    points_total: int

    @property
    def complete(self) -> bool:
        return self.completed_total >= self.points_total


def open_storage(url: str | None, default_path: str | Path):
    """An Optuna storage from a URL.

    Args:
        url: None for a SQLite file at `default_path`; an RDB URL (`sqlite:///sweep.db`,
            `postgresql://user@host/db`, `mysql+pymysql://…`); `journal:PATH` (or a path ending in
            `.log` / `.journal`) for a journal file on a shared filesystem; or a path ending in
            `.db` / `.sqlite` for a SQLite file.
        default_path: the SQLite file used when `url` is None.

    Raises:
        ConfigError: an unrecognised URL or a storage that cannot be opened.
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    text = str(url) if url is not None else f"sqlite:///{Path(default_path).resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if text.startswith("journal:") or (("://" not in text)
                                           and text.endswith((".log", ".journal"))):
            path = Path(text[len("journal:"):] if text.startswith("journal:") else text)
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if "://" not in text:
            if not text.endswith((".db", ".sqlite", ".sqlite3")):
                raise ConfigError(f"storage {text!r} is not a URL; give sqlite:///FILE.db, "
                                  f"postgresql://…, mysql://… or journal:FILE.log")
            text = f"sqlite:///{Path(text).resolve()}"
        engine_kwargs: dict[str, Any] = {}
        if text.startswith("sqlite"):
            Path(text.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": 120}}
        from sqlalchemy.exc import IntegrityError, OperationalError

        for attempt in range(8):
            try:
                storage = RDBStorage(text, engine_kwargs=engine_kwargs)
                if text.startswith("sqlite"):
                    _serialize_sqlite(storage.engine)
                return storage
            except (OperationalError, IntegrityError):
                # workers creating the schema of a new database at once: the losers of the race
                # on a table or on the schema version row find the schema a moment later
                if attempt == 7:
                    raise
                time.sleep(0.2 + 0.3 * attempt)
    except ConfigError:
        raise
    except Exception as exc:  # sqlalchemy and driver errors have many types
        raise ConfigError(f"storage {text!r} cannot be opened ({str(exc).splitlines()[0]}); "
                          f"check the URL and that its database driver is installed") from None


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction `BEGIN IMMEDIATE` (SQLAlchemy's recipe for pysqlite).

    Python's sqlite3 driver starts a transaction only at the first write, so Optuna's
    read-check-write that moves a trial from WAITING to RUNNING is not atomic across processes on
    SQLite: two workers can both read WAITING and both claim the trial (seen here with three
    workers). Taking the write lock when the transaction begins serializes those transactions,
    as the row lock (`SELECT … FOR UPDATE`) does on PostgreSQL and MySQL.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()   # connections opened before the listeners existed are replaced


class Sweep:
    """Workers' view of one sweep study.

    Args:
        storage: an Optuna storage (`open_storage`).
        study_name: the study holding the sweep.
        identity: what results depend on besides the point (model fingerprint, evaluation set);
            a study made with another identity is refused instead of mixing results.
        heartbeat_s: seconds between heartbeats of a running point.
        grace_s: a running point without a heartbeat for this long is taken to be dead.
        poll_s: seconds between looks at the storage while other workers finish.
    """

    def __init__(self, storage, study_name: str, identity: Mapping[str, Any],
                 heartbeat_s: float = 5.0, grace_s: float = 60.0, poll_s: float = 1.0) -> None:
        import optuna

        if grace_s <= 2 * heartbeat_s:
            raise ConfigError(f"grace period {grace_s} s must exceed twice the heartbeat interval "
                              f"{heartbeat_s} s")
        self.storage = storage
        self.study = optuna.create_study(study_name=study_name, storage=storage,
                                         direction="maximize", load_if_exists=True)
        self.study_id = storage.get_study_id_from_name(study_name)
        self.heartbeat_s, self.grace_s, self.poll_s = heartbeat_s, grace_s, poll_s
        self._check_identity(dict(identity))

    # --- reading ----------------------------------------------------------------------------

    def _trials(self, states=None):
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def completed(self) -> dict[str, list[dict]]:
        """point key -> result rows, for every point with a COMPLETE trial."""
        from optuna.trial import TrialState

        out = {}
        for t in self._trials((TrialState.COMPLETE,)):
            key = t.user_attrs.get(POINT_ATTR)
            if key is not None and key not in out:
                out[key] = t.user_attrs.get(ROWS_ATTR, [])
        return out

    def get_attr(self, name: str) -> Any:
        return self.storage.get_study_user_attrs(self.study_id).get(name)

    def set_attr(self, name: str, value: Any) -> None:
        self.storage.set_study_user_attr(self.study_id, name, value)

    def _check_identity(self, identity: dict) -> None:
        stored = self.get_attr(IDENTITY_ATTR)
        identity = json.loads(json.dumps(identity))
        if stored is None:
            self.set_attr(IDENTITY_ATTR, identity)
            return
        for field in sorted(set(stored) | set(identity)):
            if stored.get(field) != identity.get(field):
                raise ProfileError(
                    f"sweep storage holds study {self.study.study_name!r} made with "
                    f"{field}={stored.get(field)!r}, this run has {identity.get(field)!r}; use "
                    f"another --out or --storage, or rerun with the same settings")

    # --- coordination -----------------------------------------------------------------------

    def ensure(self, keys: Sequence[str]) -> int:
        """Enqueue every point of `keys` that has no WAITING, RUNNING or COMPLETE trial."""
        from optuna.trial import TrialState

        alive = {t.user_attrs.get(POINT_ATTR) for t in self._trials(
            (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))}
        added = 0
        for key in keys:
            if key not in alive:
                self.study.enqueue_trial({}, user_attrs={POINT_ATTR: key})
                added += 1
        return added

    def fail_stale(self) -> int:
        """Move RUNNING trials without a recent heartbeat to FAIL; returns how many this worker did."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, failed = time.time(), 0
        for t in self._trials((TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is None or now - float(beat) <= self.grace_s:
                continue
            try:
                self.storage.set_trial_user_attr(t._trial_id, "failed_reason",
                                                 f"no heartbeat for {now - float(beat):.0f} s")
                if self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    failed += 1
            except UpdateFinishedTrialError:
                continue  # another worker failed it first
        return failed

    def _claim(self, wanted: set[str]) -> tuple[int, str] | None | bool:
        """Take a WAITING trial of a wanted point: (trial id, key); False when the claimed trial
        was a duplicate (try again); None when nothing is waiting."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        waiting = sorted(self._trials((TrialState.WAITING,)), key=lambda t: t.number)
        for t in waiting:
            key = t.user_attrs.get(POINT_ATTR)
            if key not in wanted:
                continue
            try:
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue
            except UpdateFinishedTrialError:
                continue
            self.storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, time.time())
            first = self._first_owner(key, t.number)
            if first is not None:
                try:
                    self.storage.set_trial_user_attr(t._trial_id, "duplicate_of", first)
                    self.storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)
                except UpdateFinishedTrialError:
                    pass
                return False
            return t._trial_id, key
        return None

    def _first_owner(self, key: str, number: int) -> int | None:
        """The number of a trial that takes precedence over trial `number` for `key`, if any."""
        from optuna.trial import TrialState

        for t in self._trials():
            if t.number == number or t.user_attrs.get(POINT_ATTR) != key:
                continue
            if t.state == TrialState.COMPLETE:
                return t.number
            if t.number < number and t.state in (TrialState.WAITING, TrialState.RUNNING):
                return t.number
        return None

    def _finish(self, trial_id: int, key: str, value: float, rows: list[dict]) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState, create_trial

        self.storage.set_trial_user_attr(trial_id, ROWS_ATTR, rows)
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:
            # taken for dead while it ran (a stalled heartbeat): keep the result unless the
            # retry already completed
            if key not in self.completed():
                self.study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                                  user_attrs={POINT_ATTR: key, ROWS_ATTR: rows}))

    def _fail(self, trial_id: int, message: str) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(trial_id, "error", message[:500])
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass

    # --- the worker loop --------------------------------------------------------------------

    def run(self, keys: Sequence[str], run_point: RunPoint, *, max_evals: int | None = None,
            on_result: Callable[[dict[str, list[dict]]], None] | None = None,
            wait_for_others: bool = True, progress: Progress | None = None) -> SweepStats:
        """Run points of `keys` until none is left (or `max_evals` were run by this worker).

        Args:
            keys: the grid's point keys, in the order they should run.
            run_point: `run_point(key) -> (value, rows)`; rows are JSON-able dicts.
            max_evals: stop after running this many points (others stay enqueued for a rerun).
            on_result: called with every completed point's rows after each point this worker
                finishes (write the output files there).
            wait_for_others: when nothing is left to claim, wait for points other workers are
                running (and take them over if those workers die).
            progress: `progress(completed, total, label)`.

        Returns:
            What this worker did and how far the sweep is.
        """
        wanted = set(keys)
        ran: list[str] = []
        dups = stale = 0
        self.ensure(keys)
        while True:
            done = set(self.completed()) & wanted
            if progress:
                progress(len(done), len(wanted), "sweep")
            if max_evals is not None and len(ran) >= max_evals:
                break
            claim = self._claim(wanted)
            if claim is False:
                dups += 1
                continue
            if claim is None:
                stale += self.fail_stale()
                self.ensure(keys)
                if self._running(wanted) and wait_for_others:
                    time.sleep(self.poll_s)
                    continue
                if self._waiting(wanted):
                    continue
                break
            trial_id, key = claim
            if progress:
                progress(len(done), len(wanted), key)
            beat = _Heartbeat(self.storage, trial_id, self.heartbeat_s)
            try:
                with beat:
                    value, rows = run_point(key)
            except BaseException as exc:
                self._fail(trial_id, f"{type(exc).__name__}: {exc}")
                raise
            self._finish(trial_id, key, float(value), rows)
            ran.append(key)
            if on_result:
                on_result(self.completed())
        done = set(self.completed()) & wanted
        if progress:
            progress(len(done), len(wanted), "sweep")
        return SweepStats(tuple(ran), dups, stale, len(done), len(wanted))

    def _running(self, wanted: set[str]) -> bool:
        from optuna.trial import TrialState

        return any(t.user_attrs.get(POINT_ATTR) in wanted for t in self._trials((TrialState.RUNNING,)))

    def _waiting(self, wanted: set[str]) -> bool:
        from optuna.trial import TrialState

        return any(t.user_attrs.get(POINT_ATTR) in wanted for t in self._trials((TrialState.WAITING,)))


class _Heartbeat:
    """Stamp a trial's heartbeat attribute from a background thread while a point runs."""

    def __init__(self, storage, trial_id: int, interval_s: float) -> None:
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # the trial was finished elsewhere, or the storage hiccuped
                continue

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
