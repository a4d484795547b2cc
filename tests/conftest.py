"""Shared fixtures: the real embedded model (loaded once), test SAEs + profiles in a temp dir,
and a real server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from ablation.hooks import ProfileTable
from ablation.profiles import default_profiles_dir, load_profiles
from server.app import build_app
from server.models import hooked_transformer, load_model
from server.settings import Settings
from tests.helpers import TEST_PROFILES, build_sae, identity_sae, save_sae, write_profile


@pytest.fixture(scope="session")
def lm():
    return load_model("gemma-3-270m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tl(lm):
    return hooked_transformer(lm)


@pytest.fixture(scope="session")
def test_profiles_dir(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("saes")
    d_in = lm.model.config.hidden_size
    rand = save_sae(build_sae("standard", d_in, seed=0), root / "random")
    ident = save_sae(identity_sae(d_in), root / "identity")
    pdir = root / "profiles"
    pdir.mkdir()
    for name, iv in TEST_PROFILES.items():
        write_profile(pdir, name, rand, **iv)
    write_profile(pdir, "t_identity", ident)
    return pdir


@pytest.fixture(scope="session")
def table(lm, test_profiles_dir):
    profiles = load_profiles([default_profiles_dir(), test_profiles_dir], lm.name)
    return ProfileTable(profiles, lm.device, lm.dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """build_app under uvicorn on 127.0.0.1:<free port>, in a thread of the test process."""

    def __init__(self, settings: Settings, lm, table):
        self.port = free_port()
        settings = settings.model_copy(update={"port": self.port})
        self.app = build_app(settings, lm, table)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(lm, table, test_profiles_dir):
    settings = Settings(profiles=[default_profiles_dir(), test_profiles_dir], max_model_len=512)
    with LiveServer(settings, lm, table) as s:
        yield s
