"""Run ``airflow standalone`` for a test: a private AIRFLOW_HOME, a free port, and a clean stop.

Standalone stops cleanly only on SIGINT, which a background process started from a non-interactive
shell ignores; so it is started through a tiny launcher that restores the SIGINT handler in a new
session, and stopped with SIGINT, then (if anything is left) with SIGTERM/SIGKILL to its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chroma_server import free_port

_LAUNCHER = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@dataclass
class Standalone:
    home: Path
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever the parent left behind in its group
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        if self.process.poll() is None:
            self.process.wait(timeout=10)


def start_standalone(home: Path, extra_env: dict[str, str], timeout_s: float = 240) -> Standalone:
    """Start standalone in ``home`` (created) and return once the API answers with a token."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "passwords.json").write_text(json.dumps({"admin": "admin"}))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        # standalone starts its components as `airflow ...` subprocesses, found on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__PORT": str(port),
        # task supervisors reach the Execution API on the same (random) port, not the default 8080
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        **extra_env,
    }
    log = home / "standalone.log"
    airflow = str(Path(sys.executable).with_name("airflow"))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, airflow, "standalone"],
            env=env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Standalone(home, port, process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"airflow standalone exited with {process.returncode}:\n{server.log_tail()}")
        try:
            server.token = server.request("POST", "/auth/token", {"username": "admin", "password": "admin"})[
                "access_token"
            ]
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
            time.sleep(1)
    server.stop()
    raise RuntimeError(f"airflow standalone did not serve within {timeout_s} s:\n{server.log_tail()}")
