"""vLLM's compiled mode (the default of `--engine vllm`; the shared vllm_server runs with --enforce-eager):
the edit's boundaries inside the compiled graph give eager mode's tokens and logprobs under every profile
mode, mixed-profile batches equal solo rows, and a profile added at run time at hook points no served
profile used (layer 0's input, a middle layer's input, the last layer's output) is applied although the
graph was compiled before it came."""

import concurrent.futures as cf

import httpx
import pytest
import yaml

from ablation.spec import default_profiles_dir, load_profiles
from server.live import ServerProcess
from tests.helpers import staggered_texts
from tests.server.test_vllm_engine import LOGPROB_ATOL, PROMPTS, SHIPPED, TEST_MODES, complete

ADAPTERS = {"hp_rmu", "hp_npo"}  # vLLM's CPU backend runs eagerly whenever LoRA is on: not served here
MODES = [p for p in SHIPPED if p not in ADAPTERS] + TEST_MODES


@pytest.fixture(scope="module")
def compiled(test_profiles_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    shipped = root / "shipped"  # the shipped profiles without an adapter, their file paths made absolute
    shipped.mkdir()
    for name, spec in load_profiles([default_profiles_dir()], "gemma-3-270m").items():
        if not spec.adapter:
            (shipped / f"{name}.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    log = open(root / "server.log", "w")
    args = ["--engine", "vllm", "--profiles", str(shipped), "--profiles", str(test_profiles_dir),
            "--max-model-len", "512", "--profiles-dir", str(root / "runtime")]
    with ServerProcess(*args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log=log) as s:
        s.log_path = root / "server.log"
        yield s


def batch(url: str, profile: str) -> list[dict]:
    body = {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "logprobs": 0, "profile": profile}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"], key=lambda c: c["index"])


def same(profile: str, a: list[dict], b: list[dict]) -> None:
    for prompt, x, y in zip(PROMPTS, a, b):
        assert x["logprobs"]["tokens"] == y["logprobs"]["tokens"], (profile, prompt, x["text"], y["text"])
        worst = max(abs(p - q) for p, q in zip(x["logprobs"]["token_logprobs"], y["logprobs"]["token_logprobs"]))
        assert worst < LOGPROB_ATOL, (profile, prompt, worst)


def test_the_model_was_compiled(compiled):
    log = compiled.log_path.read_text()
    assert "Warming up model for the compilation" in log and "AOT compil" in log, log[-3000:]


def test_compiled_equals_eager_under_every_profile_mode(compiled, vllm_server):
    with cf.ThreadPoolExecutor(2 * len(MODES)) as pool:
        eager, graph = ([pool.submit(batch, url, p) for p in MODES] for url in (vllm_server.url, compiled.url))
        eager, graph = [f.result() for f in eager], [f.result() for f in graph]
    for profile, a, b in zip(MODES, eager, graph):
        same(profile, a, b)
    texts = {p: [c["text"] for c in g] for p, g in zip(MODES, graph)}
    assert texts["hp_unlearn"] != texts["baseline"] and texts["t_clamp"] != texts["baseline"]


def test_mixed_profile_batch_rows_equal_solo_rows(compiled):
    profiles = ["baseline", "hp_unlearn", "t_sequence", "prompted", "t_clamp", "sw_unlearn", "t_steer"]
    jobs = [(p, PROMPTS[j % len(PROMPTS)]) for j, p in enumerate(profiles * 2)]
    solo = {(p, q): complete(compiled.url, q, p, max_tokens=10)["text"] for p, q in set(jobs)}
    for job, text in zip(jobs, staggered_texts(compiled.url, jobs, 10)):
        assert text == solo[job], job


@pytest.mark.parametrize("hookpoint", ["blocks.0.hook_resid_pre", "blocks.9.hook_resid_pre",
                                       "blocks.17.hook_resid_post"])
def test_a_profile_added_at_run_time_at_a_new_boundary(compiled, server, test_profiles_dir, hookpoint):
    """Against the built-in engine (eager transformers) given the same profile at run time."""
    name = "rt_" + hookpoint.replace(".", "_")
    spec = {"name": name, "model": "gemma-3-270m", "interventions": [{
        "hookpoint": hookpoint, "sae": str(test_profiles_dir.parent / "random"), "keep_error": True,
        "condition": "token", "edits": [{"feature": 1, "value": -40.0}, {"feature": 2, "value": -40.0}]}]}
    for s in (compiled, server):
        r = httpx.post(s.url + "/v1/profiles", json=spec, timeout=300)
        assert r.status_code == 201, r.text
    try:
        same(name, batch(server.url, name), batch(compiled.url, name))
        assert [c["text"] for c in batch(compiled.url, name)] != [c["text"] for c in batch(compiled.url, "baseline")]
    finally:
        for s in (compiled, server):
            httpx.delete(f"{s.url}/v1/profiles/{name}", timeout=60)
