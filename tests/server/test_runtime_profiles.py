"""Runtime profiles (POST/DELETE /v1/profiles) on both engines: served without a restart, while other
requests stream, kept across a restart, refused clearly; and a profile the engine does not hold fails
its request instead of serving the plain model."""

import concurrent.futures as cf
import json
import time

import httpx

from ablation.spec import default_profiles_dir, load_profile
from server.live import LiveServer
from server.settings import Settings
from tests.helpers import metric

PROMPT = "Harry Potter studies at"


def spec_like(name: str, shipped: str = "gemma-3-270m.hp_unlearn") -> dict:
    """A shipped profile's spec under another name (its SAE paths made absolute by the loader)."""
    spec = load_profile(default_profiles_dir() / f"{shipped}.yaml").model_dump(mode="json")
    return {**spec, "name": name}


def greedy(url: str, profile: str, prompt: str = PROMPT, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "profile": profile, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def text(url: str, profile: str, **kw) -> str:
    r = greedy(url, profile, **kw)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_added_profile_serves_like_its_file_then_goes(api_server, runtime_dir):
    url = api_server.url
    r = httpx.post(url + "/v1/profiles", json=spec_like("rt_hp"), timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "rt_hp" and r.json()["interventions"][0]["hookpoint"].startswith("blocks.")
    assert (runtime_dir(api_server) / "rt_hp.yaml").exists()
    assert "rt_hp" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert text(url, "rt_hp") == text(url, "hp_unlearn") != text(url, "baseline")
    assert metric(url, "obliviate_requests_total", profile="rt_hp", status="200") >= 1
    r = httpx.delete(url + "/v1/profiles/rt_hp", timeout=60)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not (runtime_dir(api_server) / "rt_hp.yaml").exists()
    e = greedy(url, "rt_hp").json()["error"]
    assert e["code"] == "profile_not_found"
    assert "rt_hp" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_yaml_body_and_the_errors(api_server):
    url = api_server.url
    yaml_body = ("name: rt_yaml\nmodel: gemma-3-270m\ninterventions:\n"
                 f"  - sae: {spec_like('x')['interventions'][0]['sae']}\n"
                 "    hookpoint: blocks.12.hook_resid_post\n    edits: [{feature: 3, value: 0}]\n")
    r = httpx.post(url + "/v1/profiles", content=yaml_body, headers={"content-type": "application/yaml"}, timeout=300)
    assert r.status_code == 201, r.text
    try:
        again = httpx.post(url + "/v1/profiles", content=yaml_body, timeout=60)
        assert again.status_code == 409 and again.json()["error"]["code"] == "profile_exists"
    finally:
        assert httpx.delete(url + "/v1/profiles/rt_yaml").status_code == 200

    def error(body, status, **kw):
        r = httpx.post(url + "/v1/profiles", timeout=60, **({"json": body} if not isinstance(body, bytes) else
                                                            {"content": body}), **kw)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return err

    assert "neither JSON nor YAML" in error(b"name: [unclosed", 400)["message"]
    assert error(b"[1, 2]", 400)["message"].startswith("the body must be a profile spec")
    assert error({**spec_like("rt_bad"), "name": "no spaces allowed"}, 400)["param"] == "name"
    assert "not found" in error({**spec_like("rt_bad"), "interventions": [
        {**spec_like("x")["interventions"][0], "sae": "/nowhere/sae"}]}, 400)["message"]
    assert "gemma-2b" in error({**spec_like("rt_bad"), "model": "gemma-2b"}, 400)["message"]
    wide = {**spec_like("x")["interventions"][0], "edits": [{"feature": 10**7, "value": 0}]}
    assert "SAE width" in error({**spec_like("rt_bad"), "interventions": [wide]}, 400)["message"]
    assert not any(p["name"] == "rt_bad" for p in httpx.get(url + "/v1/profiles").json()["data"])
    gone = httpx.delete(url + "/v1/profiles/nope")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "profile_not_found"
    shipped = httpx.delete(url + "/v1/profiles/hp_unlearn")
    assert shipped.status_code == 409 and shipped.json()["error"]["code"] == "profile_read_only"
    assert greedy(url, "hp_unlearn").status_code == 200


def test_adding_a_profile_while_8_clients_stream_changes_none_of_them(api_server):
    url = api_server.url
    kw = dict(max_tokens=48, ignore_eos=True)
    expected = text(url, "hp_unlearn", **kw)

    def stream() -> str:
        body = {"prompt": PROMPT, "temperature": 0, "profile": "hp_unlearn", "stream": True, **kw}
        out = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(out)

    with cf.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(stream) for _ in range(8)]
        time.sleep(2)  # the streams are under way
        assert not any(f.done() for f in running)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/profiles", json=spec_like("rt_live", "gemma-3-270m.sw_unlearn"), timeout=300)
        added = time.perf_counter() - t0
        assert r.status_code == 201, r.text
        first = greedy(url, "rt_live", max_tokens=1)
        served = time.perf_counter() - t0
        assert first.status_code == 200, first.text
        texts = [f.result() for f in running]
    print(f"{api_server.url}: POST answered in {added:.2f} s, first rt_live token {served:.2f} s after the POST, "
          f"with 8 streams running")
    assert texts == [expected] * 8
    assert text(url, "rt_live") == text(url, "sw_unlearn")
    assert httpx.delete(url + "/v1/profiles/rt_live").status_code == 200


def test_an_added_profile_survives_a_restart(server, runtime_dir, test_profiles_dir):
    r = httpx.post(server.url + "/v1/profiles", json=spec_like("rt_kept", "gemma-3-270m.sw_unlearn"), timeout=300)
    assert r.status_code == 201, r.text
    try:
        before = text(server.url, "rt_kept")
        settings = Settings(profiles=[default_profiles_dir(), test_profiles_dir], profiles_dir=runtime_dir(server),
                            max_model_len=512)
        with LiveServer(settings) as again:  # a second server: its own model, profiles read from the folders
            assert text(again.url, "rt_kept") == before
            assert httpx.delete(again.url + "/v1/profiles/rt_kept").status_code == 200
        assert not (runtime_dir(server) / "rt_kept.yaml").exists()
    finally:
        httpx.delete(server.url + "/v1/profiles/rt_kept")


def test_a_profile_the_engine_lost_fails_its_request_and_is_counted(server):
    """Fail closed: the serving layer still lists the profile, the engine's table no longer has it."""
    assert httpx.post(server.url + "/v1/profiles", json=spec_like("rt_lost"), timeout=300).status_code == 201
    engine = server.app.state.serving.engine
    engine.table.remove("rt_lost")  # as a worker that lost its table
    before = metric(server.url, "obliviate_requests_total", profile="rt_lost", status="500")
    r = greedy(server.url, "rt_lost")
    assert r.status_code == 500 and "not installed" in r.json()["error"]["message"], r.text
    assert metric(server.url, "obliviate_requests_total", profile="rt_lost", status="500") == before + 1
    server.app.state.serving.profile_removed("rt_lost")
    server.app.state.admin.runtime.discard("rt_lost")


def test_an_inline_profile_serves_like_the_named_one(api_server):
    url = api_server.url
    spec = spec_like("ignored")
    del spec["name"]
    for iv in spec["interventions"]:
        iv["sae"] = iv["sae"].rstrip("/").split("/")[-1]  # the SAE by its folder's name
    before = metric(url, "obliviate_requests_total", profile="inline", status="200")
    r = greedy(url, spec)
    assert r.status_code == 200, r.text
    assert r.json()["profile"] == "inline" and r.json()["choices"][0]["text"] == text(url, "hp_unlearn")
    assert greedy(url, spec).json()["choices"][0]["text"] == text(url, "hp_unlearn")  # installed once, reused
    assert metric(url, "obliviate_requests_total", profile="inline", status="200") == before + 2
    assert "inline" not in {p["name"] for p in httpx.get(url + "/v1/profiles").json()["data"]}
    bad = greedy(url, {**spec, "interventions": [{**spec["interventions"][0], "sae": "/tmp/any-sae"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_sae", bad.text
    steered = {**spec["interventions"][0], "steer": {"vector": "/etc/hostname", "scale": 1.0}}
    bad = greedy(url, {**spec, "interventions": [steered]})  # a request never names a file to read
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_steering_vector", bad.text
    bad = greedy(url, {**spec, "markup_guard": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "profile", bad.text
    bad = greedy(url, {**spec, "model": "gemma-2b"})  # checked as a POSTed spec is: for the served model
    assert bad.status_code == 400 and "gemma-2b" in bad.json()["error"]["message"], bad.text
