"""A real Prometheus (Debian's package; the README's test command installs it) scraping a live
server under mixed-profile traffic: the PromQL a dashboard needs, and every query of the shipped
Grafana dashboard, return data."""

import concurrent.futures as cf
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server.live import free_port

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "obliviate.json"
PROFILES = ["baseline", "hp_unlearn", "sae_only"]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:  # a failure, not a skip: CI must have it
        pytest.fail("prometheus is not installed: the README's test command installs Debian's `prometheus`")
    d = tmp_path_factory.mktemp("prometheus")
    target = server.url.removeprefix("http://")
    (d / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: obliviate\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"prometheus did not start: {(d / 'prometheus.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def query(prom: str, promql: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": promql}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def by_profile(result: list[dict]) -> dict[str, float]:
    return {s["metric"].get("profile"): float(s["value"][1]) for s in result}


def traffic(url: str, per_profile: int, max_tokens: int) -> None:
    body = lambda p: {"prompt": "Tell me a story about", "max_tokens": max_tokens, "temperature": 0,  # noqa: E731
                      "profile": p}
    with cf.ThreadPoolExecutor(len(PROFILES) * per_profile) as pool:
        for r in pool.map(lambda p: httpx.post(url + "/v1/completions", json=body(p), timeout=120),
                          PROFILES * per_profile):
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def scraped(server, prometheus):
    """Two waves of mixed-profile traffic a few scrapes apart (a rate needs two samples), then a wait
    until Prometheus has the second."""
    deadline = time.time() + 30
    while not query(prometheus, "up{job='obliviate'} == 1") and time.time() < deadline:
        time.sleep(0.2)  # the first scrape: before it, nothing would count as an increase
    traffic(server.url, 1, 4)
    time.sleep(3)
    traffic(server.url, 4, 24)
    time.sleep(3)
    return prometheus


def test_prometheus_per_profile_request_rate_and_tokens(scraped):
    rate = by_profile(query(scraped, "sum by (profile) (rate(obliviate_requests_total{status='200'}[1m]))"))
    print("request rate by profile:", rate)
    assert all(rate.get(p, 0) > 0 for p in PROFILES), rate
    tokens = by_profile(query(scraped, "sum by (profile) (increase(obliviate_generation_tokens_total[1m]))"))
    assert all(tokens.get(p, 0) > 0 for p in PROFILES), tokens


def test_prometheus_latency_histograms_by_profile(scraped):
    for metric in ("obliviate_time_to_first_token_seconds", "obliviate_time_per_output_token_seconds"):
        p50 = by_profile(query(scraped, f"histogram_quantile(0.5, sum by (le, profile) (rate({metric}_bucket[1m])))"))
        print(metric, "p50 by profile:", p50)
        assert all(0 < p50.get(p, float("nan")) < 60 for p in PROFILES), (metric, p50)


def test_prometheus_queue_depth_and_in_flight(scraped):
    assert query(scraped, "obliviate_requests_waiting")  # the queue-depth series is scraped
    in_flight = query(scraped, "max_over_time(obliviate_sequences_in_flight[1m])")
    assert float(in_flight[0]["value"][1]) > 0  # the second wave was in flight while scraped


def test_every_grafana_dashboard_query_returns_data(scraped):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    empty = []
    for e in exprs:
        result = query(scraped, e.replace("$__rate_interval", "1m"))
        if not result and "rejected" not in e and "aborted" not in e:  # no rejections or aborts in this traffic
            empty.append(e)
    assert not empty, empty
