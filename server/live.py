"""A server in a background thread of the current process (tests, notebooks, sweeps): the same
build_app under uvicorn on a free loopback port."""

from __future__ import annotations

import socket
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
