"""Shared fixtures: the real embedded model (loaded once), test SAEs + profiles in a temp dir,
and a real server on a loopback port."""

from __future__ import annotations

import pytest

from ablation.hooks import ProfileTable
from ablation.profiles import default_profiles_dir, load_profiles
from server.live import LiveServer
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


@pytest.fixture(scope="session")
def server(lm, table, test_profiles_dir):
    settings = Settings(profiles=[default_profiles_dir(), test_profiles_dir], max_model_len=512)
    with LiveServer(settings, lm, table) as s:
        yield s
