"""`obliviate serve --replicas 2`: the app on Ray Serve, two replicas of the built-in engine behind one
endpoint, with keys; every response names its replica; one /metrics scrape counts both replicas'
requests; a killed replica is replaced while the other serves, and requests that were on it end with an
error the client retries (never a hang)."""

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from clients.http import Client
from server.live import ServerProcess

KEY = "sk-ray-test-0001"
JOBS = [("Harry Potter studies at", "hp_unlearn"), ("Harry Potter studies at", "baseline"),
        ("Han Solo flies the Millennium", "sw_unlearn"), ("The capital of France is", "hp_sw_unlearn"),
        ("Hermione Granger is", "sae_only"), ("The largest planet is", "prompted")] * 2


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"name": "lab", "key": KEY, "profiles": ["*"]}]}))
    args = ["--replicas", "2", "--replica-threads", "1", "--keys", str(d / "keys.yaml"), "--max-model-len", "512"]
    with open(d / "server.log", "w") as log:
        try:
            with ServerProcess(*args, log=log, env={"RAY_USAGE_STATS_ENABLED": "0"}) as s:
                yield s
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its log ends:\n{open(log.name).read()[-3000:]}") from None


def greedy(url: str, prompt: str, profile: str, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "profile": profile, **kw}
    return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def replica(r: httpx.Response) -> str:
    return r.headers["obliviate-replica"]


def test_two_replicas_serve_mixed_profiles_with_keys(ray_server):
    solo = {}
    for prompt, profile in JOBS[:6]:
        r = greedy(ray_server.url, prompt, profile)
        assert r.status_code == 200, r.text
        solo[prompt, profile] = r.json()["choices"][0]["text"]
    with cf.ThreadPoolExecutor(len(JOBS)) as pool:
        rs = list(pool.map(lambda job: greedy(ray_server.url, *job), JOBS))
    assert [r.json()["choices"][0]["text"] for r in rs] == [solo[job] for job in JOBS]
    assert len({replica(r) for r in rs}) == 2  # both replicas served
    scraped_by = set()  # one scrape, whichever replica answers it, counts every replica's completions
    for _ in range(20):
        if len(scraped_by) == 2:
            break
        m = httpx.get(ray_server.url + "/metrics", timeout=60)
        scraped_by.add(replica(m))
        served = {}
        for fam in text_string_to_metric_families(m.text):
            for s in fam.samples:
                if s.name == "obliviate_requests_total" and s.labels["status"] == "200":
                    served[s.labels["replica"], s.labels["profile"]] = s.value
        assert {r for r, _ in served} == {replica(r) for r in rs}
        assert sum(served.values()) == 6 + len(JOBS)
        assert sum(v for (_, p), v in served.items() if p == "hp_unlearn") == 1 + JOBS.count(JOBS[0])
    assert len(scraped_by) == 2
    unauthorized = httpx.post(ray_server.url + "/v1/completions", json={"prompt": "x"})
    assert unauthorized.status_code == 401 and replica(unauthorized)  # errors too come from a replica
    assert greedy(ray_server.url, "x", "nope").json()["error"]["code"] == "profile_not_found"


def test_a_killed_replica_is_replaced_and_no_request_is_lost(ray_server):
    url = ray_server.url
    expected = greedy(url, *JOBS[0]).json()["choices"][0]["text"]
    seen = {replica(greedy(url, *JOBS[0])) for _ in range(8)}
    victim = sorted(seen)[0]
    client = Client(url, api_key=KEY, retries=6, backoff=1.0)

    def run(_):
        return client.complete(JOBS[0][0], JOBS[0][1], max_tokens=8, temperature=0).choices[0].text

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(run, i) for i in range(16)]
        time.sleep(1)
        os.kill(int(victim.split("@")[1]), signal.SIGKILL)
        texts = [f.result(timeout=600) for f in pending]
    assert texts == [expected] * 16  # every request answered (retried where it was on the dead replica)
    while time.perf_counter() - t0 < 300:  # Serve starts a replacement
        names = {replica(greedy(url, *JOBS[0])) for _ in range(6)}
        if len(names) == 2 and victim not in names:
            break
        time.sleep(2)
    replaced = time.perf_counter() - t0
    print(f"replica {victim} killed; 16/16 requests answered; a new replica served {replaced:.0f} s later")
    assert len(names) == 2 and victim not in names
