"""`obliviate serve --engine vllm --replicas 1`: the vLLM engine (an AsyncLLM with the hooks' worker
extension, LoRA for the adapter profiles) inside a Ray Serve replica gives the built-in engine's greedy
text for SAE, adapter and prompted profiles, with the replica header, the trigger audit and the per-replica
metrics label. One replica, not two: two vLLM workers beside the session's servers would not fit CI's memory
(each takes ≈ 4.7 GB with a 1 GiB KV cache)."""

import concurrent.futures as cf

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.live import ServerProcess

JOBS = [("Harry Potter studies at", "hp_unlearn"), ("Harry Potter studies at", "baseline"),
        ("Han Solo flies the Millennium", "sw_unlearn"), ("The headmaster of Hogwarts is Albus", "hp_rmu"),
        ("The largest planet is", "prompted"), ("Hermione Granger is", "hp_npo")]
# both shipped adapters in one batch: with a LoRA slot for each and none free, vLLM's CPU LoRA would give the
# rows without an adapter the last slot's (the engine keeps one free: LoraOptions.check)


@pytest.fixture(scope="module")
def ray_vllm(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("ray-vllm") / "server.log", "w")
    args = ["--engine", "vllm", "--replicas", "1", "--replica-threads", "2", "--max-model-len", "512"]
    try:
        with ServerProcess(*args, log=log, env={"RAY_USAGE_STATS_ENABLED": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}) as s:
            yield s
    except RuntimeError as e:
        log.close()
        raise RuntimeError(f"{e}; its log ends:\n{open(log.name).read()[-3000:]}") from None
    log.close()


def greedy(url: str, prompt: str, profile: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "profile": profile}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def test_vllm_replica_gives_the_builtin_engines_text(ray_vllm, server):
    with cf.ThreadPoolExecutor(len(JOBS)) as pool:  # sent together: one batch on the replica
        rs = list(pool.map(lambda job: greedy(ray_vllm.url, *job), JOBS))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    builtin = [greedy(server.url, *job).json()["choices"][0] for job in JOBS]
    choices = [r.json()["choices"][0] for r in rs]
    assert [c["text"] for c in choices] == [c["text"] for c in builtin]
    assert choices[0]["text"] != choices[1]["text"]  # hp_unlearn forgets what baseline says
    assert choices[0]["unlearning"] == builtin[0]["unlearning"] and choices[0]["unlearning"]["triggered"]
    name = rs[0].headers["obliviate-replica"]
    assert {r.headers["obliviate-replica"] for r in rs} == {name}
    served = {(s.labels["replica"], s.labels["profile"]): s.value
              for fam in text_string_to_metric_families(httpx.get(ray_vllm.url + "/metrics", timeout=60).text)
              for s in fam.samples if s.name == "obliviate_requests_total" and s.labels["status"] == "200"}
    assert served == {(name, p): 1.0 for _, p in JOBS}  # each profile once, labelled with its replica
    missing = greedy(ray_vllm.url, "x", "nope")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "profile_not_found"
