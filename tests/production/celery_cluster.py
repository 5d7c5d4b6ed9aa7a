"""Drive ``scripts/multi-worker.sh`` from a test: start/stop, the REST API, and which worker ran what.

The script is the user-facing recipe; this module only calls it and reads what it leaves behind (the
cluster's environment file, the pid files, the worker logs), so the test exercises exactly what a user runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "multi-worker.sh"
WORKERS = ("a", "b")
TERMINAL = ("success", "failed", "upstream_failed", "skipped", "removed")
_WORKLOAD = re.compile(r"task_id='([^']+)', dag_id='([^']+)', run_id='([^']+)', try_number=(\d+)")


class ClusterError(RuntimeError):
    """The cluster script failed, or the cluster did not do something in time."""


def run_script(home: Path, env: dict[str, str], *args: str, timeout_s: float = 600) -> str:
    result = subprocess.run(
        [str(SCRIPT), *args],
        env={**env, "MULTI_WORKER_HOME": str(home)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise ClusterError(
            f"multi-worker.sh {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result.stdout


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise ClusterError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Cluster:
    """A running cluster: its directory, the environment every component runs with, and an API client."""

    home: Path
    caller_env: dict[str, str] = field(repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    token: str = field(default="", repr=False)

    # -- life cycle -----------------------------------------------------------------------------------

    def script(self, *args: str, timeout_s: float = 600) -> str:
        return run_script(self.home, self.caller_env, *args, timeout_s=timeout_s)

    def start(self) -> None:
        self.script("start")
        self.env = self._read_env()
        self.token = self.new_token()

    def _read_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in self.script("env").splitlines():
            for word in shlex.split(line)[1:] if line.startswith("export ") else ():
                key, _, value = word.partition("=")
                env[key] = value
        return env

    @property
    def airflow_home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    @property
    def api_url(self) -> str:
        return self.env["MULTI_WORKER_API_URL"]

    @property
    def store_url(self) -> str:
        return self.env["AIRFLOW__GOVERNED_AI__STORE_URL"]

    def worker_pid(self, worker: str) -> int | None:
        path = self.home / "run" / f"worker-{worker}.pid"
        return int(path.read_text()) if path.exists() else None

    def component_trees(self) -> list[int]:
        """Every process of every component the script recorded (for the no-leftovers check)."""
        pids: list[int] = []
        for pid_file in (self.home / "run").glob("*.pid"):
            try:
                root = psutil.Process(int(pid_file.read_text()))
                pids += [root.pid, *(p.pid for p in root.children(recursive=True))]
            except (psutil.NoSuchProcess, ValueError):
                continue
        return pids

    # -- REST API -------------------------------------------------------------------------------------

    def new_token(self) -> str:
        password = json.loads((self.home / "passwords.json").read_text())["admin"]
        reply = self.request("POST", "/auth/token", {"username": "admin", "password": password}, auth=False)
        return str(reply["access_token"])

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, auth: bool = True
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def status_of(self, path: str, *, auth: bool) -> int:
        try:
            self.request("GET", path, auth=auth)
        except urllib.error.HTTPError as error:
            return error.code
        return 200

    def wait_for_dags(self, dag_ids: list[str], timeout_s: float = 180) -> None:
        def all_parsed() -> bool:
            listed = self.request("GET", "/api/v2/dags?limit=100")["dags"]
            return set(dag_ids) <= {d["dag_id"] for d in listed}

        wait_until(all_parsed, f"DAGs {dag_ids} to be parsed", timeout_s, poll_s=2)

    def trigger(self, dag_id: str, run_id: str) -> str:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.request(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None}
        )
        return str(run["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        quoted = urllib.parse.quote(run_id, safe="")
        return str(self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")["state"])

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 600) -> str:
        return str(
            wait_until(
                lambda: (s := self.run_state(dag_id, run_id)) in ("success", "failed") and s,
                f"{dag_id} {run_id} to finish",
                timeout_s,
                poll_s=2,
            )
        )

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        quoted = urllib.parse.quote(run_id, safe="")
        return dict(self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}"))

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        quoted = urllib.parse.quote(run_id, safe="")
        tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances")["task_instances"]
        return {
            (t["task_id"] if t["map_index"] == -1 else f"{t['task_id']}[{t['map_index']}]"): str(t["state"])
            for t in tis
        }

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        quoted = urllib.parse.quote(run_id, safe="")
        entry = self.request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/return_value"
        )
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value

    # -- which worker ran what ------------------------------------------------------------------------

    def worker_running(self, pid: int) -> str | None:
        """The worker whose process tree holds ``pid`` (a task's process), or None."""
        roots = {self.worker_pid(w): w for w in WORKERS}
        try:
            process = psutil.Process(pid)
            for ancestor in [process, *process.parents()]:
                if ancestor.pid in roots:
                    return roots[ancestor.pid]
        except psutil.NoSuchProcess:
            return None
        return None

    def executions(self) -> list[tuple[str, str, str, str, int]]:
        """(worker, dag_id, run_id, task_id, try_number) for every task a worker's log says it executed."""
        found = []
        for worker in WORKERS:
            log = self.home / "logs" / f"worker-{worker}.log"
            for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
                if "Executing workload in Celery" in line and (match := _WORKLOAD.search(line)):
                    task_id, dag_id, run_id, try_number = match.groups()
                    found.append((worker, dag_id, run_id, task_id, int(try_number)))
        return found

    def workers_of(self, dag_id: str, run_id: str, task_id: str) -> dict[int, str]:
        """try_number -> worker, for one task instance."""
        return {t: w for w, d, r, task, t in self.executions() if (d, r, task) == (dag_id, run_id, task_id)}


def clean_environment() -> dict[str, str]:
    """This process's environment without the test session's Airflow settings (its private home etc.)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
