"""Start and stop a real Chroma server (``chroma run``) for tests and benchmarks, on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ChromaServer:
    host: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path = field(repr=False)

    def connection_json(self) -> str:
        return f'{{"conn_type": "governed_ai_chroma", "host": "{self.host}", "port": {self.port}}}'

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_chroma_server(timeout_s: float = 60.0) -> ChromaServer:
    """``chroma run`` with a fresh data directory; returns once its heartbeat answers."""
    chroma = Path(sys.executable).with_name("chroma")
    data_dir = Path(tempfile.mkdtemp(prefix="governed-ai-chroma-server-"))
    port = free_port()
    log_path = data_dir.with_suffix(".log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(chroma),
                "run",
                "--path",
                str(data_dir / "data"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ChromaServer("127.0.0.1", port, data_dir, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chroma run exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"chroma run did not answer within {timeout_s} s: {log_path.read_text()[-2000:]}")
