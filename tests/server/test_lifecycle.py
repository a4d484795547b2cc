"""A server's life beyond single requests, on real server processes: a request timeout, a graceful
drain on SIGTERM, kill -9 and restart on the same cache, /health when the engine has died."""

import json
import os
import signal
import threading
import time

import httpx
import pytest

from models.loading import load_model
from server.live import LiveServer, ServerProcess
from server.settings import Settings
from tests.helpers import metric


def stream_lines(url: str, body: dict, lines: list, started: threading.Event) -> None:
    """Reads a streamed completion into `lines` (until the server ends it, or the connection breaks)."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            lines.append(r.status_code)
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as e:
        lines.append(e)
    started.set()


def test_a_request_timeout_then_a_graceful_drain_on_sigterm(tmp_path):
    with open(tmp_path / "server.log", "w") as log, \
            ServerProcess("--request-timeout", "6", "--drain-timeout", "4", log=log) as s:
        t0 = time.perf_counter()
        # ignore_eos: an unseeded sample may end early, and then the request finishes within the limit
        long_body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=long_body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.perf_counter() - t0 < 30
        assert metric(s.url, "obliviate_requests_aborted_total", reason="timeout") == 1
        assert metric(s.url, "obliviate_sequences_in_flight") == 0

        short, long = [], []
        started = [threading.Event(), threading.Event()]
        readers = [threading.Thread(target=stream_lines, args=(s.url, body, out, ev)) for body, out, ev in (
            ({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}, short, started[0]),
            (long_body, long, started[1]))]
        for t in readers:
            t.start()
        assert all(ev.wait(60) for ev in started)
        t_term = time.perf_counter()
        os.killpg(s.proc.pid, signal.SIGTERM)
        code = s.proc.wait(60)
        stopped = time.perf_counter() - t_term
        for t in readers:
            t.join(10)
        print(f"SIGTERM -> exit {code} in {stopped:.1f} s")
        # uvicorn ends a SIGTERM-initiated shutdown by re-raising SIGTERM (systemd counts it as clean)
        assert code in (0, -signal.SIGTERM) and stopped < 4 + 20  # the drain limit, then the engine's shutdown
        assert short[0] == 200 and short[-1] == "data: [DONE]"  # in flight when SIGTERM came: finished whole
        text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in short[1:-1] if ln.startswith("data: {"))
        assert text.strip()
        assert long[-1] != "data: [DONE]"  # 1500 tokens could not finish within the drain limit: cut off


def test_kill_9_then_restart_serves_the_same_from_the_cache(tmp_path):
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    hp = {"prompt": "Harry Potter goes to school at", "max_tokens": 8, "temperature": 0, "profile": "hp_unlearn"}
    texts, audited = [], []
    for run in range(2):  # the restart also turns the trigger audit off: the same text, without the field
        args = ["--no-trigger-audit"] if run else []
        with open(tmp_path / f"server{run}.log", "w") as log, ServerProcess(*args, log=log) as s:
            texts.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])
            audited.append(httpx.post(s.url + "/v1/completions", json=hp, timeout=60).json()["choices"][0])
            if run == 0:
                os.killpg(s.proc.pid, signal.SIGKILL)
                assert s.proc.wait(30) == -signal.SIGKILL
    assert texts[0] == texts[1] and texts[0].strip()
    assert audited[0]["unlearning"]["triggered"] and "unlearning" not in audited[1]
    assert audited[0]["text"] == audited[1]["text"]
    assert "preparing" not in (tmp_path / "server1.log").read_text()  # the cache was used, not rebuilt


@pytest.fixture
def own_server():
    """A server with a model of its own (the shared one's engine must not be disturbed)."""
    lm = load_model("gemma-3-270m", device="cpu", dtype="float32")
    with LiveServer(Settings(max_model_len=256), lm) as s:
        yield s


def test_health_is_503_and_requests_get_503_once_the_engine_has_died(own_server, monkeypatch):
    engine = own_server.app.state.serving.engine

    def broken(*_):
        raise RuntimeError("simulated fault outside any request")

    monkeypatch.setattr(engine, "_admit", broken)
    r = httpx.post(own_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # the request it died on
    assert not engine.health()
    h = httpx.get(own_server.url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "unavailable"
    r = httpx.post(own_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]
