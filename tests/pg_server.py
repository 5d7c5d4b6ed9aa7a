"""Start and stop a throwaway PostgreSQL cluster for tests and benchmarks.

The cluster lives in a fresh temporary directory, listens on 127.0.0.1 only (on a free port picked at
run time) with trust authentication, and keeps its unix socket inside its own directory, so several test
sessions on one machine never collide. PostgreSQL refuses to run as root; when we are root the server
binaries are run as the ``postgres`` OS user (``runuser``), which owns the directory.

Usage::

    server = start_postgres()
    try:
        url = server.create_database("ledger_test")  # postgresql+psycopg://postgres@127.0.0.1:PORT/ledger_test
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. Install them with "
    "`apt-get install postgresql` (Debian/Ubuntu), or point GOVERNED_AI_PG_BIN at the directory that "
    "holds initdb and pg_ctl."
)
_SERVER_USER = "postgres"
_START_ATTEMPTS = 3


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the cluster would not start."""


@dataclass
class PgServer:
    """A running throwaway cluster. ``url`` points at the default ``postgres`` database."""

    url: str
    host: str
    port: int
    base_dir: Path
    bin_dir: Path
    _run_as: list[str] = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database of this cluster."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (a plain identifier) and return its URL."""
        import psycopg  # imported here so that merely importing this module needs no driver

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be a plain identifier, got {name!r}")
        conninfo = f"host={self.host} port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        """Stop the cluster (fast shutdown) and delete its directory. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        subprocess.run(
            [
                *self._run_as,
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.base_dir, ignore_errors=True)


def find_postgres_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl/postgres, or raise :class:`PostgresUnavailable`."""
    candidates: list[str] = []
    if os.environ.get("GOVERNED_AI_PG_BIN"):
        candidates.append(os.environ["GOVERNED_AI_PG_BIN"])
    # Debian/Ubuntu keep the server binaries out of PATH, one directory per major version: newest first.
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: _major_version(path), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        directory = Path(candidate)
        if all((directory / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresUnavailable(INSTALL_HINT)


def _major_version(path: str) -> int:
    try:
        return int(Path(path).parent.name.split(".")[0])
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_as_prefix() -> tuple[list[str], int | None, int | None]:
    """Command prefix and uid/gid for running the server binaries (postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam(_SERVER_USER)
    except KeyError as error:
        raise PostgresUnavailable(
            f"running as root, but there is no {_SERVER_USER!r} OS user to run PostgreSQL as. {INSTALL_HINT}"
        ) from error
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root, but `runuser` (util-linux) is missing")
    return [runuser, "-u", _SERVER_USER, "--"], user.pw_uid, user.pw_gid


def start_postgres(parent_dir: Path | str | None = None, *, fsync: bool = False) -> PgServer:
    """Create and start a fresh cluster in a new directory under ``parent_dir`` (default: system temp).

    ``fsync=False`` (the default) trades crash safety for speed, which is right for throwaway test data;
    benchmarks that want realistic commit costs pass ``fsync=True``.
    """
    bin_dir = find_postgres_bin_dir()
    run_as, uid, gid = _run_as_prefix()
    base_dir = Path(tempfile.mkdtemp(prefix="governed-ai-pg-", dir=parent_dir))
    try:
        if uid is not None and gid is not None:
            os.chown(base_dir, uid, gid)
            _check_reachable(base_dir, run_as)
        data_dir = base_dir / "data"
        _run(
            [
                *run_as,
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
        )
        server = _start_cluster(bin_dir, base_dir, run_as, fsync=fsync)
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise
    atexit.register(server.stop)
    return server


def _start_cluster(bin_dir: Path, base_dir: Path, run_as: list[str], *, fsync: bool) -> PgServer:
    log_file = base_dir / "server.log"
    last_error: PostgresUnavailable | None = None
    # The free port can be taken by someone else between probing and binding: retry with a new one.
    for _attempt in range(_START_ATTEMPTS):
        port = _free_port()
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
            f"-k {base_dir}",
            "-c max_connections=200",
        ]
        if not fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        try:
            _run(
                [
                    *run_as,
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(base_dir / "data"),
                    "-l",
                    str(log_file),
                    "-o",
                    " ".join(options),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                "pg_ctl start",
            )
        except PostgresUnavailable as error:
            last_error = error
            continue
        return PgServer(
            url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
            host="127.0.0.1",
            port=port,
            base_dir=base_dir,
            bin_dir=bin_dir,
            _run_as=run_as,
        )
    log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no server log)"
    raise PostgresUnavailable(f"{last_error}\nserver log tail:\n{log}")


def _check_reachable(base_dir: Path, run_as: list[str]) -> None:
    # A parent directory with mode 0700 (e.g. pytest's /tmp/pytest-of-root) would lock the server user out.
    probe = subprocess.run([*run_as, "test", "-w", str(base_dir)], check=False, capture_output=True)
    if probe.returncode != 0:
        raise PostgresUnavailable(
            f"the {_SERVER_USER!r} OS user cannot write to {base_dir}; pass a parent_dir it can traverse "
            "(the system temp directory works)"
        )


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise PostgresUnavailable(
            f"{what} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
        )
