"""A server in a background thread of the current process (tests, notebooks, sweeps): the same
build_app under uvicorn on a free loopback port; or one in a subprocess (the vLLM engine, which
starts processes of its own; benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from server.app import build_app
from server.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings, lm=None, table=None):
        self.port = free_port()
        settings = settings.model_copy(update={"port": self.port, "host": "127.0.0.1"})
        self.app = build_app(settings, lm, table)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
            if not self.thread.is_alive():
                break
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServerProcess:
    """`obliviate serve ARGS` (or another server command) in a subprocess of its own process group, on
    a free loopback port, for one `with` block; the whole group is stopped at the end."""

    def __init__(self, *args: str, cmd: list[str] | None = None, env: dict | None = None, log=None,
                 start_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = cmd or [sys.executable, "-m", "cli", "serve"]
        self.cmd = [*base, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log, self.start_timeout = log, start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
                                     start_new_session=True)
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.cmd)} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"{' '.join(self.cmd)} did not answer /health in {self.start_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
