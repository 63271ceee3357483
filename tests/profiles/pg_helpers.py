"""A throwaway PostgreSQL server for the sweep tests and `benchmarks/postgres_sweep.py`.

`initdb` into a new temporary directory, then `pg_ctl start` on a free port of 127.0.0.1 (TCP on
the loopback only; the Unix socket lives in that directory); `close()` stops the server and removes
the directory, and runs at interpreter exit too if nobody called it. The binaries come from
`/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu; the newest version), `/usr/pgsql-*/bin`
(RHEL), or `initdb` on PATH. `initdb` refuses to run as root, so as root the server runs as the
unprivileged `postgres` user (Debian's package creates it), else `nobody`.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "moesz"      # the database superuser initdb creates (trust authentication, loopback only)


def postgres_bin() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`, or None when PostgreSQL is not installed."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb") +
                   glob.glob("/usr/pgsql-*/bin/initdb"), key=version, reverse=True)
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    for initdb in found:
        bin_dir = Path(initdb).resolve().parent
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary directory (a context manager).

    Args:
        durable: keep PostgreSQL's default durability (fsync on every commit); the tests turn it
            off for speed, the benchmark keeps it, as a real deployment would.
    """

    def __init__(self, durable: bool = False) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) found")
        self.durable = durable
        self.port: int | None = None
        self.running = False
        self._as: dict = {}
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
                self.owner = (pw.pw_uid, pw.pw_gid)
                break
            else:
                raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' "
                                   "user exists to run PostgreSQL as (initdb refuses root)")
        # the server's user must reach its directory: as root, a TMPDIR under /root would not do
        base = "/tmp" if self._as and os.path.isdir("/tmp") else None
        self.dir = Path(tempfile.mkdtemp(prefix="moesz-pg-", dir=base))
        atexit.register(self.close)
        if self._as:
            os.chown(self.dir, *self.owner)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    # --- commands ---------------------------------------------------------------------------

    def _server_cmd(self, *args: str, check: bool = True, timeout: float = 60):
        """A server binary (initdb, pg_ctl) run as the server's user."""
        return subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.dir, check=check,
                              timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, **self._as)

    def _client_cmd(self, *args: str):
        return subprocess.run([str(self.bin / args[0]), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", USER, *args[1:]], check=True, timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        """initdb (first time only) and start on a free loopback port; waits until it accepts."""
        if not self.data.exists():
            out = self._server_cmd("initdb", "-D", str(self.data), "-U", USER, "-A", "trust",
                                   "-E", "UTF8", "--no-sync", check=False)
            if out.returncode != 0:
                raise RuntimeError(f"initdb failed: {out.stdout.strip()[-2000:]}")
        for _ in range(5):        # another process may take the free port before the server
            self.port = self.port or _free_port()
            if self._pg_ctl_start():
                return self
            self.port = None
        raise RuntimeError(f"PostgreSQL did not start: {self._log_tail()}")

    def _pg_ctl_start(self) -> bool:
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.dir}"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        out = self._server_cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                               "-t", "60", "-o", " ".join(options), "start", check=False,
                               timeout=90)
        self.running = out.returncode == 0
        return self.running

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: like an administrator's restart, sessions are terminated)."""
        if self.running:
            self._server_cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                             check=False, timeout=90)
            self.running = False

    def restart(self) -> None:
        """Stop (fast) and start again on the same port."""
        self.stop("fast")
        if not self._pg_ctl_start():
            raise RuntimeError(f"PostgreSQL did not restart: {self._log_tail()}")

    def close(self) -> None:
        """Stop the server, whatever state it is in, and remove its directory."""
        if self.running:
            self.stop("immediate")
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():      # pg_ctl failed: end the server this object started, by its id
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # --- databases --------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL (the default driver: psycopg 3)."""
        self._client_cmd("createdb", name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def sql(self, query: str, database: str = "postgres") -> str:
        """Run one query with psql; its unaligned, tuples-only output."""
        return self._client_cmd("psql", "-d", database, "-At", "-c", query).stdout.strip()

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text().strip().splitlines()[-5:])
        except OSError:
            return "no server log"
