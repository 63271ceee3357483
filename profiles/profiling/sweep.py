"""A sweep over grid points as an Optuna study that many workers can share without repeats.

Each point of the grid (a target x codec x level ...) is one enqueued Optuna trial carrying the
point's key in its user attributes; its result rows are stored in the trial when it completes, so
the storage itself is the record of the sweep and any worker can write the output files from it.

Optuna's `GridSampler` alone can hand the same point to two workers, and a worker that dies leaves
its trial RUNNING forever. Here instead:

- **claim before run**: a worker takes a point only by moving its WAITING trial to RUNNING, which
  the storage does atomically (a row lock in RDB storages, the ordered log in a journal); a
  worker that loses the race moves on to the next point;
- **duplicates are harmless**: workers that start together may enqueue a point twice (they
  enqueue chunks of points in a random order, re-reading the study between chunks, so it stays
  rare); on claiming, a trial yields (state PRUNED, `duplicate_of`) to any COMPLETE trial of its
  point and to any earlier-numbered one still WAITING or RUNNING, so one copy runs;
- **one read per point**: each turn of a worker reads the study once and claims from that
  snapshot, in the grid's order (the storage's cost per point grows with the number of trials,
  since Optuna reads whole studies);
- **heartbeats**: a thread stamps the running trial every `heartbeat_s` seconds (a trial system
  attribute, so it works for SQLite, PostgreSQL, MySQL and journal files alike);
- **stale trials are retried**: a RUNNING trial whose last heartbeat is older than `grace_s` is
  moved to FAIL (only one worker can win that transition) and its point is enqueued again;
- **resume**: rerunning enqueues only points without a COMPLETE trial;
- **outages**: every storage call is retried while the database is unreachable (a restart), for
  at most `reconnect_s` (half the grace period by default, so that a live worker's heartbeat
  gap across an outage it survives stays below the grace period); past that the worker stops with
  a `StorageError` and a rerun resumes (`profiles.profiling.storage.Reconnecting`).

Heartbeats use the workers' wall clocks: on several machines keep them in sync (NTP) and keep
`grace_s` well above the clock skew.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from profiles.errors import ConfigError, ProfileError, StorageError
from profiles.profiling.storage import Reconnecting, display_url, open_storage  # noqa: F401

POINT_ATTR = "point"
ROWS_ATTR = "rows"
HEARTBEAT_ATTR = "moesz_heartbeat"
IDENTITY_ATTR = "moesz_identity"
Progress = Callable[[int, int, str], None]
RunPoint = Callable[[str], tuple[float, list[dict]]]
ENQUEUE_CHUNK = 16      # points enqueued between two reads of the study (see Sweep.ensure)


@dataclass(frozen=True)
class SweepStats:
    """What one worker did: points it ran, duplicates it skipped, stale trials it failed."""

    ran: tuple[str, ...]
    skipped_duplicates: int
    stale_failed: int
    completed_total: int
    points_total: int
    storage_s: float = 0.0          # seconds this worker's sweep loop spent in storage calls
    points_s: float = 0.0           # seconds it spent running points (evaluating)
    storage_calls: int = 0
    outages: int = 0                # storage calls that lost the connection and were retried

    @property
    def complete(self) -> bool:
        return self.completed_total >= self.points_total


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
        reconnect_s: how long a storage call is retried while the database is unreachable
            before `StorageError` (default: half of `grace_s`).

    Raises:
        ConfigError: a grace period not above twice the heartbeat interval.
        ProfileError: the study was made with another identity.
        StorageError: the storage stopped answering for longer than `reconnect_s`.
    """

    def __init__(self, storage, study_name: str, identity: Mapping[str, Any],
                 heartbeat_s: float = 5.0, grace_s: float = 60.0, poll_s: float = 1.0,
                 reconnect_s: float | None = None) -> None:
        import optuna

        if grace_s <= 2 * heartbeat_s:
            raise ConfigError(f"grace period {grace_s} s must exceed twice the heartbeat interval "
                              f"{heartbeat_s} s")
        label = display_url(getattr(storage, "url", None)) or type(storage).__name__
        self.storage = Reconnecting(storage, grace_s / 2 if reconnect_s is None else reconnect_s,
                                    label)
        self.study_name = study_name
        self.study = self.storage.call(optuna.create_study, study_name=study_name,
                                       storage=storage, direction="maximize",
                                       load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(study_name)
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
                    f"sweep storage holds study {self.study_name!r} made with "
                    f"{field}={stored.get(field)!r}, this run has {identity.get(field)!r}; use "
                    f"another --out or --storage, or rerun with the same settings")

    # --- coordination -----------------------------------------------------------------------

    def ensure(self, keys: Sequence[str]) -> int:
        """Enqueue every point of `keys` that has no WAITING, RUNNING or COMPLETE trial.

        The missing points are enqueued in chunks of `ENQUEUE_CHUNK`, in a random order of
        chunks, and the storage is read again before each chunk: workers that start together
        then mostly enqueue different chunks instead of every one enqueueing every point (each
        duplicate costs a claim to prune it). Order of enqueueing does not decide the order of
        running: `_claim` follows `keys`.
        """
        from optuna.trial import TrialState

        alive = self._alive()
        missing = [k for k in keys if k not in alive]
        chunks = [missing[i:i + ENQUEUE_CHUNK] for i in range(0, len(missing), ENQUEUE_CHUNK)]
        random.shuffle(chunks)
        added = 0
        for i, chunk in enumerate(chunks):
            alive = self._alive() if i else set()
            for key in chunk:
                if key not in alive:
                    self._add(TrialState.WAITING, {POINT_ATTR: key})
                    added += 1
        return added

    def _alive(self) -> set[str]:
        from optuna.trial import TrialState

        return {t.user_attrs.get(POINT_ATTR) for t in self._trials(
            (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))}

    def _add(self, state, user_attrs: dict, value: float | None = None) -> None:
        """A new trial (what `Study.enqueue_trial` / `add_trial` do, through the retrying
        storage)."""
        from optuna.trial import create_trial

        trial = create_trial(state=state, value=value, user_attrs=user_attrs,
                             system_attrs={"fixed_params": {}} if value is None else {})
        self.storage.create_new_trial(self.study_id, template_trial=trial)

    def fail_stale(self, trials=None) -> int:
        """Move RUNNING trials without a recent heartbeat to FAIL; returns how many this worker did.

        Args:
            trials: a snapshot of the study's trials just taken (read here when None).
        """
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, failed = time.time(), 0
        for t in self._trials((TrialState.RUNNING,)) if trials is None else trials:
            if t.state != TrialState.RUNNING:
                continue
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

    def _claim(self, order: dict[str, int], trials) -> tuple[tuple[int, str] | None, int]:
        """Take a WAITING trial of a wanted point, in the order of the grid.

        Args:
            order: wanted point key -> its position in the grid.
            trials: a snapshot of every trial of the study, taken just before.

        Returns:
            ((trial id, key) or None when nothing is left to claim, duplicates pruned). A claimed
            trial yields (PRUNED, `duplicate_of`) when the snapshot holds a COMPLETE trial of its
            point or an earlier-numbered WAITING or RUNNING one: trial numbers are given in
            commit order, so every earlier trial of the point is in any snapshot that holds this
            one, and the earliest live trial of a point is never pruned.
        """
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        complete: dict[str, int] = {}   # point -> a COMPLETE trial of it
        earliest: dict[str, int] = {}   # point -> its lowest-numbered WAITING or RUNNING trial
        for t in trials:
            key = t.user_attrs.get(POINT_ATTR)
            if t.state == TrialState.COMPLETE:
                complete.setdefault(key, t.number)
            elif t.state in (TrialState.WAITING, TrialState.RUNNING):
                earliest[key] = min(earliest.get(key, t.number), t.number)
        waiting = sorted((t for t in trials if t.state == TrialState.WAITING
                          and t.user_attrs.get(POINT_ATTR) in order),
                         key=lambda t: (order[t.user_attrs[POINT_ATTR]], t.number))
        pruned = 0
        for t in waiting:
            key = t.user_attrs[POINT_ATTR]
            try:
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue
            except UpdateFinishedTrialError:
                continue
            first = complete.get(key, earliest[key])
            if first != t.number:
                try:
                    self.storage.set_trial_user_attr(t._trial_id, "duplicate_of", first)
                    self.storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)
                except UpdateFinishedTrialError:
                    pass
                pruned += 1
                continue
            self.storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, time.time())
            return (t._trial_id, key), pruned
        return None, pruned

    def _finish(self, trial_id: int, key: str, value: float, rows: list[dict]) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.storage.set_trial_user_attr(trial_id, ROWS_ATTR, rows)
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:
            # taken for dead while it ran (a stalled heartbeat): keep the result unless the
            # retry already completed
            if key not in self.completed():
                self._add(TrialState.COMPLETE, {POINT_ATTR: key, ROWS_ATTR: rows}, value)

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
        from optuna.trial import TrialState

        order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        ran: list[str] = []
        dups = stale = 0
        points_s = 0.0
        s0, c0, o0 = self.storage.seconds, self.storage.calls, self.storage.outages
        self.ensure(keys)
        while True:
            trials = self._trials()             # one read of the study per turn
            done = _completed_keys(trials, order)
            if progress:
                progress(len(done), len(order), "sweep")
            if max_evals is not None and len(ran) >= max_evals:
                break
            claim, pruned = self._claim(order, trials)
            dups += pruned
            if claim is None:
                if pruned:
                    continue
                stale += self.fail_stale(trials)
                self.ensure(keys)
                now = self._trials()
                if any(t.state == TrialState.WAITING and t.user_attrs.get(POINT_ATTR) in order
                       for t in now):
                    continue
                if wait_for_others and any(t.state == TrialState.RUNNING and
                                           t.user_attrs.get(POINT_ATTR) in order for t in now):
                    time.sleep(self.poll_s)
                    continue
                break
            trial_id, key = claim
            if progress:
                progress(len(done), len(order), key)
            # the heartbeat thread uses the storage directly: a beat lost to an outage is
            # simply followed by the next one
            beat = _Heartbeat(self.storage.inner, trial_id, self.heartbeat_s)
            t0 = time.perf_counter()
            try:
                with beat:
                    value, rows = run_point(key)
            except StorageError:
                raise       # the storage is gone: the trial's heartbeat stops, a rerun retries it
            except BaseException as exc:
                self._fail(trial_id, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                points_s += time.perf_counter() - t0
            self._finish(trial_id, key, float(value), rows)
            ran.append(key)
            if on_result:
                on_result(self.completed())
        done = _completed_keys(self._trials((TrialState.COMPLETE,)), order)
        if progress:
            progress(len(done), len(order), "sweep")
        st = self.storage
        return SweepStats(tuple(ran), dups, stale, len(done), len(order),
                          storage_s=st.seconds - s0, points_s=points_s,
                          storage_calls=st.calls - c0, outages=st.outages - o0)


def _completed_keys(trials, order) -> set[str]:
    from optuna.trial import TrialState

    return {t.user_attrs.get(POINT_ATTR) for t in trials
            if t.state == TrialState.COMPLETE and t.user_attrs.get(POINT_ATTR) in order}


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
