"""Opening the Optuna storage a sweep lives in, and riding through its outages.

`open_storage` turns a `--storage` value into an Optuna storage: a SQLite file (the default), an
RDB URL (`postgresql://…`, `mysql+pymysql://…`) for workers on many machines, or a journal file.
A missing database driver is named with the package that provides it, and passwords in URLs are
masked in every message (`display_url`).

`Reconnecting` wraps a storage so that a database restart does not end a worker: a call that
fails because the connection was lost (SQLAlchemy's `OperationalError` / `InterfaceError`, e.g.
PostgreSQL's "terminating connection due to administrator command" or "connection refused") is
retried with a fresh connection until `patience_s` has passed, then a `StorageError` says so in
one line. Retrying is safe for the sweep's calls (`profiles.profiling.sweep`): a claim whose
commit was lost with the connection leaves a RUNNING trial without heartbeats, which the stale
check fails and enqueues again; a completion retried after its commit went through finds the
trial finished and keeps the result; an enqueue that went through twice is a harmless duplicate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from profiles.errors import ConfigError, StorageError

# SQLAlchemy driver name -> how to install it (the default driver of postgresql:// is psycopg 3
# since SQLAlchemy 2.1; 2.0 and older used psycopg2)
_DRIVER_HINTS = {
    "psycopg": 'pip install "psycopg[binary]" (the moesz[postgres] extra), or write '
               "postgresql+psycopg2://… to use psycopg2",
    "psycopg2": "pip install psycopg2-binary, or write postgresql://… and install the "
                'moesz[postgres] extra ("psycopg[binary]")',
    "pg8000": "pip install pg8000",
    "pymysql": "pip install PyMySQL",
    "mysqldb": "pip install mysqlclient, or write mysql+pymysql://… and pip install PyMySQL",
    "mysqlconnector": "pip install mysql-connector-python",
}


def display_url(url: str | None) -> str | None:
    """`url` with its password replaced by `***` (for messages and files); other text unchanged."""
    if url is None or "://" not in str(url):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: nothing to mask
        return str(url)


def open_storage(url: str | None, default_path: str | Path):
    """An Optuna storage from a URL.

    Args:
        url: None for a SQLite file at `default_path`; an RDB URL (`sqlite:///sweep.db`,
            `postgresql://user@host/db`, `mysql+pymysql://…`); `journal:PATH` (or a path ending in
            `.log` / `.journal`) for a journal file on a shared filesystem; or a path ending in
            `.db` / `.sqlite` for a SQLite file.
        default_path: the SQLite file used when `url` is None.

    Raises:
        ConfigError: an unrecognised URL, a missing database driver (the message names the
            package to install) or a storage that cannot be opened.
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
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

        if not text.startswith("sqlite"):
            _connect_once(text)       # a wrong host, database or password fails here, at once
        for attempt in range(8):
            try:
                storage = RDBStorage(text, engine_kwargs=engine_kwargs)
                if text.startswith("sqlite"):
                    _serialize_sqlite(storage.engine)
                return storage
            except (OperationalError, IntegrityError, ProgrammingError):
                # workers creating the schema of a new database at once: the losers of the race
                # on a table (SQLite: "already exists"; PostgreSQL: a duplicate type or table)
                # or on the schema version row find the schema a moment later
                if attempt == 7:
                    raise
                time.sleep(0.2 + 0.3 * attempt)
    except ConfigError:
        raise
    except ImportError as exc:  # Optuna's "Failed to import DB access module", from the driver's
        raise ConfigError(_missing_driver(text, exc)) from None
    except Exception as exc:  # sqlalchemy and driver errors have many types
        raise ConfigError(f"storage {display_url(text)!r} cannot be opened "
                          f"({_first_line(exc)}); check the URL and that its database server "
                          f"is running and reachable") from None


def _connect_once(text: str) -> None:
    """Open and close one connection to an RDB URL (the driver is imported here)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(text, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _missing_driver(text: str, exc: ImportError) -> str:
    """One line naming the driver a URL needs and the package that provides it."""
    cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
    module = getattr(cause, "name", None)
    try:
        from sqlalchemy.engine import make_url

        driver = make_url(text).get_dialect().driver
    except Exception:
        driver = module
    name = (module or driver or "its driver").split(".")[0]
    hint = _DRIVER_HINTS.get(driver or "") or _DRIVER_HINTS.get(name) or f"install {name}"
    return (f"storage {display_url(text)!r} cannot be opened: its database driver {name} is "
            f"not installed; {hint}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost or refused database connection.

    Optuna wraps SQLAlchemy errors in `StorageInternalError`; the cause chain is searched for
    SQLAlchemy's `OperationalError` / `InterfaceError` or a DBAPI error that invalidated its
    connection. Data errors (a value too long, a constraint) are not connection losses.
    """
    from sqlalchemy import exc as sa

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sa.OperationalError, sa.InterfaceError)) or \
                getattr(e, "connection_invalidated", False):
            return True
        e = e.__cause__ or e.__context__
    return False


class Reconnecting:
    """A storage whose calls are retried while the database is unreachable.

    Every method of the wrapped storage is available; a call that fails with a lost connection
    (`connection_lost`) is retried every `retry_s` seconds (SQLAlchemy replaces the dead
    connections) until `patience_s` seconds have passed since the first failure, then
    `StorageError` is raised. Time spent inside calls is added to `seconds` and counted in
    `calls` (the storage overhead of the calling thread).

    Args:
        storage: an Optuna storage (`open_storage`).
        patience_s: how long to keep retrying one call.
        label: the storage as shown in messages (password masked).
        retry_s: seconds between retries.
    """

    def __init__(self, storage, patience_s: float, label: str, retry_s: float = 0.5) -> None:
        self.inner, self.patience_s, self.label, self.retry_s = storage, patience_s, label, retry_s
        self.seconds = 0.0
        self.calls = 0
        self.outages = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        return lambda *args, **kwargs: self.call(attr, *args, **kwargs)

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)`, retried while the connection is lost (see the class)."""
        t0 = time.perf_counter()
        first_failure = None
        try:
            while True:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if not connection_lost(exc):
                        raise
                    now = time.monotonic()
                    if first_failure is None:
                        first_failure = now
                        self.outages += 1
                    elif now - first_failure >= self.patience_s:
                        raise StorageError(
                            f"the sweep storage {self.label} has not answered for "
                            f"{now - first_failure:.0f} s ({_first_line(_root(exc))}); points "
                            f"already completed are kept there: rerun the same command to resume "
                            f"once it is back") from None
                    time.sleep(self.retry_s)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def _root(exc: BaseException) -> BaseException:
    """The innermost cause of `exc` (the driver's own message)."""
    seen: set[int] = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc
