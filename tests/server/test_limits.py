"""A hostile or careless client against `obliviate serve` with a keys file and small limits (a real
server process): keys and profile policy, bad text, oversized bodies and fan-out, overload answered
by 429, client disconnects, a 32-client load test, and a property-based fuzz from the OpenAPI schema."""

import asyncio
import hashlib
import socket
import statistics
import time

import httpx
import openai
import pytest
import yaml

from clients.http import AsyncClient
from server.live import ServerProcess
from tests.helpers import metric

LAB, PUBLIC, OPS = "sk-lab-test-0001", "sk-public-test-0002", "sk-ops-test-0003"
BATCH, QUEUE, MAX_CHOICES, MAX_BODY = 4, 4, 6, 65536
PROFILES = ["baseline", "hp_unlearn", "sae_only", "prompted"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits")
    keys = d / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "lab", "key": LAB, "profiles": ["*"]},
        {"name": "public", "sha256": hashlib.sha256(PUBLIC.encode()).hexdigest(), "profiles": ["hp_unlearn"],
         "default_profile": "hp_unlearn"},
        {"name": "ops", "key": OPS, "profiles": ["*"], "admin": True},
    ]}))
    args = ["--keys", str(keys), "--max-batch-size", str(BATCH), "--max-queue", str(QUEUE), "--max-choices",
            str(MAX_CHOICES), "--max-body-bytes", str(MAX_BODY), "--max-model-len", "128"]
    with open(d / "server.log", "w") as log, ServerProcess(*args, log=log) as s:
        yield s


def post(server, body, key=LAB, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response with this status."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    return err


def greedy(prompt, profile=None, **kw):
    return {"prompt": prompt, "max_tokens": 6, "temperature": 0, **({"profile": profile} if profile else {}), **kw}


# ---- keys and profile policy -------------------------------------------------------------------
def test_no_key_or_a_wrong_key_is_401(limited):
    assert error_of(post(limited, greedy("Hi"), key=None), 401)["type"] == "authentication_error"
    assert error_of(post(limited, greedy("Hi"), key="sk-wrong"), 401)["code"] == "invalid_api_key"
    assert httpx.get(limited.url + "/v1/models").status_code == 401
    assert httpx.get(limited.url + "/health").status_code == 200  # probes need no key


def test_a_key_uses_only_its_profiles_also_through_model_names(limited):
    r = post(limited, greedy("Harry Potter studies at"), key=PUBLIC)
    assert r.status_code == 200 and r.json()["profile"] == "hp_unlearn"  # the key's default_profile
    for body in (greedy("Hi", "baseline"), greedy("Hi", model="gemma-3-270m:baseline"), greedy("Hi", model="baseline"),
                 greedy("Hi", "sae_only")):
        err = error_of(post(limited, body, key=PUBLIC), 403)
        assert err["code"] == "profile_not_allowed" and "hp_unlearn" in err["message"]
    assert "sae_only" not in error_of(post(limited, greedy("Hi", "nope"), key=PUBLIC), 400)["message"]
    r = post(limited, greedy("Harry Potter studies at", "baseline"), key=LAB)
    assert r.status_code == 200 and r.json()["profile"] == "baseline"


def test_only_admin_keys_change_profiles(limited):
    spec = {"name": "rt_x", "interventions": []}
    for key in (LAB, PUBLIC):
        r = httpx.post(limited.url + "/v1/profiles", json=spec, headers={"Authorization": f"Bearer {key}"})
        assert error_of(r, 403)["code"] == "admin_only"
        r = httpx.delete(limited.url + "/v1/profiles/hp_unlearn", headers={"Authorization": f"Bearer {key}"})
        assert error_of(r, 403)["code"] == "admin_only"
    assert error_of(httpx.post(limited.url + "/v1/profiles", json=spec), 401)["code"] == "missing_api_key"
    # inline profiles need `inline: true`
    r = post(limited, {**greedy("Hi"), "profile": {"interventions": []}}, key=LAB)
    assert error_of(r, 403)["code"] == "inline_not_allowed"
    # the admin key passes; this server keeps no runtime profiles (no --profiles-dir)
    r = httpx.post(limited.url + "/v1/profiles", json=spec, headers={"Authorization": f"Bearer {OPS}"})
    assert error_of(r, 400)["code"] == "no_profiles_dir"
    # a key's default profile cannot be deleted, whatever folder it came from
    r = httpx.delete(limited.url + "/v1/profiles/hp_unlearn", headers={"Authorization": f"Bearer {OPS}"})
    assert error_of(r, 409)["code"] == "profile_in_use"


def test_listings_show_only_what_the_key_may_use(limited):
    get = lambda path, key: httpx.get(limited.url + path, headers={"Authorization": f"Bearer {key}"}).json()  # noqa: E731
    public_models = {m["id"] for m in get("/v1/models", PUBLIC)["data"]}
    assert public_models == {"gemma-3-270m", "gemma-3-270m:hp_unlearn", "hp_unlearn"}
    assert [p["name"] for p in get("/v1/profiles", PUBLIC)["data"]] == ["hp_unlearn"]
    assert {"baseline", "sae_only", "hp_unlearn"} <= {p["name"] for p in get("/v1/profiles", LAB)["data"]}


def test_the_openai_client_with_a_key_and_per_key_metrics_without_secrets(limited):
    before = metric(limited.url, "obliviate_requests_total", key="public", status="200")
    client = openai.OpenAI(base_url=limited.url + "/v1", api_key=PUBLIC, max_retries=0)
    out = client.completions.create(model="hp_unlearn", prompt="Hogwarts is", max_tokens=3, temperature=0)
    assert out.choices[0].text
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="baseline", prompt="Hogwarts is", max_tokens=3)
    assert metric(limited.url, "obliviate_requests_total", key="public", status="200") == before + 1
    assert metric(limited.url, "obliviate_requests_rejected_total", reason="profile_not_allowed") >= 1
    text = httpx.get(limited.url + "/metrics").text
    assert LAB not in text and PUBLIC not in text and hashlib.sha256(PUBLIC.encode()).hexdigest() not in text


# ---- bad text, big bodies, big names, big fan-out ----------------------------------------------
@pytest.mark.parametrize("raw", [b'{"prompt": "a\\ud800b"}', b'{"prompt": ["ok", "\\udfff"]}',
                                 b'{"prompt": "x", "stop": "\\ud83d"}', b'{"prompt": "x", "model": "\\ud800"}'])
def test_lone_surrogates_are_a_400_that_names_the_field(limited, raw):
    r = httpx.post(limited.url + "/v1/completions", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {LAB}", "content-type": "application/json"})
    err = error_of(r, 400)
    assert ("lone surrogate" in err["message"] or "unicode" in err["message"]) and err["param"] in ("prompt", "stop", "model")
    assert "tokenizer" not in err["message"].lower()


def raw_request(url: str, head: str, body_parts, read_timeout: float = 10) -> tuple[int, float]:
    """Sends a request over a plain socket (body in parts, the client never waits to finish sending);
    -> (status, seconds until the status line arrived)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head.encode())
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:  # the server answered and closed: read what it said
                break
        status = s.recv(64).split(b" ")[1]
    return int(status), time.perf_counter() - t0


def test_a_huge_body_is_refused_before_it_is_read(limited):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LAB}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50_000_000}\r\n\r\n")
    status, seconds = raw_request(limited.url, head, [b'{"prompt": "' + b"a" * 60_000])
    assert status == 413
    print(f"50 MB body refused in {seconds:.3f} s")
    assert httpx.get(limited.url + "/health", timeout=5).status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(limited):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LAB}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b"a" * 16384
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] * (2 * MAX_BODY // len(part))
    status, _ = raw_request(limited.url, head, [b"c\r\n{\"prompt\": \"\r\n", *chunks])
    assert status == 413


def test_long_names_are_refused_without_being_echoed(limited):
    err = error_of(post(limited, greedy("x", model="m" * 20_000)), 400)
    assert err["param"] == "model" and len(err["message"]) < 300
    err = error_of(post(limited, greedy("x", model="m" * 200)), 404)
    assert len(err["message"]) < 1000 and "m" * 100 not in err["message"]


def test_fan_out_beyond_the_limit_is_a_400(limited):
    err = error_of(post(limited, greedy(["Hi"] * (MAX_CHOICES + 1))), 400)
    assert err["code"] == "too_many_choices" and err["param"] == "prompt"
    assert error_of(post(limited, greedy("Hi", n=MAX_CHOICES + 1)), 400)["param"] == "n"


# ---- overload, disconnects ---------------------------------------------------------------------
def test_overload_is_a_429_with_retry_after_and_leaving_clients_free_the_engine(limited):
    async def scenario():
        # two of these fill it
        long = greedy(["Once upon a time"] * ((BATCH + QUEUE) // 2), max_tokens=100, ignore_eos=True)
        async with httpx.AsyncClient(base_url=limited.url, timeout=120,
                                     headers={"Authorization": f"Bearer {LAB}"}) as c:
            holders = [asyncio.create_task(c.post("/v1/completions", json=long)) for _ in range(2)]
            deadline = time.time() + 30
            while metric(limited.url, "obliviate_sequences_in_flight") < BATCH + QUEUE and time.time() < deadline:
                await asyncio.sleep(0.1)
            r = await c.post("/v1/completions", json=greedy("One more"))
            for t in holders:
                t.cancel()  # the clients leave: their connections close
            await asyncio.gather(*holders, return_exceptions=True)
            return r

    aborted = metric(limited.url, "obliviate_requests_aborted_total", reason="cancelled")
    r = asyncio.run(scenario())
    err = error_of(r, 429)
    assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    deadline = time.time() + 10
    while metric(limited.url, "obliviate_requests_running") and time.time() < deadline:
        time.sleep(0.1)
    assert metric(limited.url, "obliviate_requests_running") == 0
    assert metric(limited.url, "obliviate_sequences_in_flight") == 0
    assert metric(limited.url, "obliviate_requests_aborted_total", reason="cancelled") == aborted + 2


def test_load_32_clients_mixed_profiles_no_errors_no_mismatches_overload_as_429(limited):
    prompts = ["The capital of France is", "Harry Potter goes to school at", "Water is made of",
               "The headmaster of Hogwarts is"]
    pairs = [(p, q) for p in prompts for q in PROFILES]
    solo = {pair: post(limited, greedy(pair[0], pair[1])).json()["choices"][0]["text"] for pair in pairs}
    overloaded = metric(limited.url, "obliviate_requests_rejected_total", reason="overloaded")

    async def client(i: int, c: AsyncClient, latencies: list) -> list[bool]:
        same = []
        for k in range(2):
            p, q = pairs[(i + 7 * k) % len(pairs)]
            t0 = time.perf_counter()
            out = await c.complete(p, q, max_tokens=6, temperature=0)
            latencies.append(time.perf_counter() - t0)
            same.append(out.choices[0].text == solo[(p, q)])
        return same

    async def load():
        c = AsyncClient(limited.url, api_key=LAB, concurrency=32, retries=100, timeout=60)
        latencies: list[float] = []
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(180):  # the bound on the whole test, not a speed claim
                results = await asyncio.gather(*(client(i, c, latencies) for i in range(32)))
        finally:
            await c.aclose()
        return results, latencies, time.perf_counter() - t0

    results, latencies, seconds = asyncio.run(load())
    flat = [x for r in results for x in r]
    refused = metric(limited.url, "obliviate_requests_rejected_total", reason="overloaded") - overloaded
    print(f"load: 32 clients x 2 requests in {seconds:.1f} s, {len(flat) * 6 / seconds:.1f} tok/s, "
          f"p50 {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s, {refused:.0f} answered 429 first")
    assert len(flat) == 64 and all(flat)  # no errors (the client raises), no mismatch against solo runs
    assert refused > 0  # overload was answered with 429 (then retried after Retry-After), not timeouts


# ---- fuzz ---------------------------------------------------------------------------------------
def short(body: dict) -> None:
    """At most 2 tokens a choice: a generated body asks for 16 to the whole context (seconds a request on
    this CPU), and the length does not change which validation a body meets."""
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and not isinstance(body[k], bool) and body[k] > 2:
            body[k] = 2
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2


def test_fuzz_from_the_openapi_schema_no_5xx_and_openai_shaped_4xx(limited):
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(limited.url + "/openapi.json")
    seen: dict[int, int] = {}
    runs = [("/v1/completions", "POST", GenerationMode.POSITIVE, 30), ("/v1/completions", "POST",
            GenerationMode.NEGATIVE, 30), ("/v1/chat/completions", "POST", GenerationMode.POSITIVE, 15),
            ("/v1/chat/completions", "POST", GenerationMode.NEGATIVE, 15), ("/v1/models", "GET", GenerationMode.POSITIVE, 3),
            ("/v1/profiles", "GET", GenerationMode.POSITIVE, 3), ("/v1/profiles", "POST", GenerationMode.POSITIVE, 10),
            ("/v1/profiles/{name}", "DELETE", GenerationMode.POSITIVE, 6)]
    for path, method, mode, examples in runs:
        op = schema[path][method]
        headers = {"Authorization": f"Bearer {OPS if 'profiles' in path and method != 'GET' else LAB}"}

        @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            if isinstance(case.body, dict) and path.endswith("completions"):
                short(case.body)
            r = case.call(base_url=limited.url, headers=headers, timeout=120)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.body, r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text

        check()
    print("fuzz statuses:", dict(sorted(seen.items())))
    assert seen.get(200) and seen.get(400)  # both valid and invalid requests were generated
