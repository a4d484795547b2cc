"""The HTTP API through the official openai client and raw httpx, on real loopback servers: the
built-in engine and the vLLM engine."""

import json
import time

import httpx
import openai
import pytest

from tests.helpers import metric


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="unused", max_retries=0)


def complete(client, **kw):
    kw = {"model": "gemma-3-270m", "max_tokens": 8, "temperature": 0, **kw}
    return client.completions.create(**kw)


def test_plain_completion_is_greedy_and_deterministic(client):
    a = complete(client, prompt="The capital of France is")
    b = complete(client, prompt="The capital of France is")
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text.strip()
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 8 and a.usage.prompt_tokens == 6


def test_streaming_yields_the_same_text(client):
    full = complete(client, prompt="Harry Potter studies at").choices[0].text
    chunks = list(complete(client, prompt="Harry Potter studies at", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 3


def test_a_vanishing_temperature_is_greedy_not_an_overflow(client):
    greedy = complete(client, prompt="The capital of France is", max_tokens=12)
    tiny = complete(client, prompt="The capital of France is", max_tokens=12, temperature=1e-300)
    assert tiny.choices[0].text == greedy.choices[0].text
    assert tiny.usage.completion_tokens == greedy.usage.completion_tokens > 0


def test_list_prompt_and_n(client):
    r = complete(client, prompt=["One, two, three,", "Monday, Tuesday,"], n=2, temperature=0.8, seed=1)
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    r2 = complete(client, prompt=["One, two, three,", "Monday, Tuesday,"], n=2, temperature=0.8, seed=1)
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]  # seeded sampling repeats


def test_token_id_prompt_equals_string_prompt(client, lm):
    ids = lm.tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert complete(client, prompt=ids).choices[0].text == complete(client, prompt="The capital of France is").choices[0].text


def test_profile_by_field_and_by_model_name_agree(client):
    prompt = "Harry Potter studies at"
    base = complete(client, prompt=prompt).choices[0].text
    by_field = complete(client, prompt=prompt, extra_body={"profile": "t_sae_only"})
    by_alias = complete(client, prompt=prompt, model="gemma-3-270m:t_sae_only")
    by_name = complete(client, prompt=prompt, model="t_sae_only")
    assert by_field.choices[0].text == by_alias.choices[0].text == by_name.choices[0].text != base
    assert by_field.model_extra["profile"] == "t_sae_only"


@pytest.mark.parametrize("profile", ["baseline", "prompted", "t_sae_only", "t_zero", "t_keep_error", "t_clamp"])
def test_every_profile_serves(client, profile):
    r = complete(client, prompt="Hermione Granger is", extra_body={"profile": profile})
    assert r.usage.completion_tokens >= 1


def test_prompted_profile_counts_its_prefix_but_does_not_echo_it(client):
    r = complete(client, prompt="Hi", echo=True, max_tokens=1, extra_body={"profile": "prompted"})
    assert r.choices[0].text.startswith("Hi") and r.usage.prompt_tokens > 20


def test_echo_logprobs_return_prompt_logprobs(client, lm):
    prompt = "The quick brown fox jumps over the lazy dog"
    r = complete(client, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    n = len(lm.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert r.choices[0].text == prompt and "".join(lp.tokens) == prompt and len(lp.tokens) == n
    assert lp.token_logprobs[0] is None  # as OpenAI and vLLM: nothing predicts the first prompt token
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == prompt.rindex(" dog")
    assert len(lp.top_logprobs) == n and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # the same token's logprob when generated matches the prompt logprob of " dog"
    gen = complete(client, prompt=prompt[: prompt.rindex(" dog")], max_tokens=1, logprobs=0)
    if gen.choices[0].text == " dog":
        assert abs(gen.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[-1]) < 1e-3
    # the sum differs by profile: that is what the loss eval measures
    other = complete(client, prompt=prompt, echo=True, logprobs=0, max_tokens=0, extra_body={"profile": "t_sae_only"})
    assert sum(other.choices[0].logprobs.token_logprobs[1:]) != sum(lp.token_logprobs[1:])


def test_token_id_prompts_echo_as_sent_and_the_generated_token_comes_last(client, lm):
    """What lm-eval's local-completions relies on: echo of token ids lists exactly those ids (a BOS the
    client sent included, with no logprob), then the one generated token, even an end-of-sequence."""
    tok = lm.tokenizer
    ids = tok("The capital of France is Paris.", add_special_tokens=False).input_ids
    for sent in (ids, [tok.bos_token_id] + ids):
        r = complete(client, prompt=sent, echo=True, logprobs=1, max_tokens=1)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(sent) + 1 and lp.token_logprobs[0] is None
        assert lp.tokens[:len(sent)] == [tok.decode([t]) for t in sent]
        assert all(v is not None for v in lp.token_logprobs[1:])
    plain = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=1).choices[0].logprobs
    bos = complete(client, prompt=[tok.bos_token_id] + ids, echo=True, logprobs=1, max_tokens=1).choices[0].logprobs
    assert plain.token_logprobs[1:] == pytest.approx(bos.token_logprobs[2:], abs=1e-4)  # the same context


def test_tokenize_detokenize_and_tokenizer_info(api_server, lm):
    url = api_server.url
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False,
                                            "return_token_strs": True}).json()
    assert r["tokens"] == lm.tokenizer("Hello world", add_special_tokens=False).input_ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512 and len(r["token_strs"]) == r["count"]
    with_bos = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert with_bos == [lm.tokenizer.bos_token_id] + r["tokens"]
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    assert error_of(api_server, {"tokens": [-1]}, 400, path="/detokenize")["param"] == "tokens"
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["bos_token"] == lm.tokenizer.bos_token and info["eos_token"] == lm.tokenizer.eos_token


def test_stop_strings_cut_the_text(client):
    full = complete(client, prompt="Monday, Tuesday, Wednesday,", max_tokens=12).choices[0].text
    word = full.split(",")[1]
    r = complete(client, prompt="Monday, Tuesday, Wednesday,", max_tokens=12, stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].text
    streamed = complete(client, prompt="Monday, Tuesday, Wednesday,", max_tokens=12, stop=[word], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_ignore_eos_generates_through_end_of_sequence(client):
    """vLLM's `ignore_eos`: a prompt whose greedy next token is <eos> still gets max_tokens tokens."""
    prompt = 'def main():\n    print(\'hi\')\n\n\nif __name__ == "__main__":\n    main()\n'
    plain = complete(client, prompt=prompt)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == 1
    forced = complete(client, prompt=prompt, extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 8
    assert forced.choices[0].text.strip() and "<eos>" not in forced.choices[0].text


# ---- every sampling field (OpenAI's and vLLM's), on both engines ---------------------------------
COUNTING = "One, two, three, four,"


def test_top_k_1_and_min_p_1_at_temperature_1_are_greedy(client):
    greedy = complete(client, prompt=COUNTING, max_tokens=12).choices[0].text
    for field in ({"top_k": 1}, {"min_p": 1.0}):
        drawn = complete(client, prompt=COUNTING, max_tokens=12, temperature=1.0, seed=5, extra_body=field)
        assert drawn.choices[0].text == greedy, field
    # and without them that seed draws something else (so the fields, not luck, made it greedy)
    assert complete(client, prompt=COUNTING, max_tokens=12, temperature=1.0, seed=5).choices[0].text != greedy


def test_logit_bias_forces_and_bans_tokens(client, lm):
    tok = lm.tokenizer
    comma = tok(",", add_special_tokens=False).input_ids[0]
    forced = complete(client, prompt=COUNTING, max_tokens=5, logit_bias={str(comma): 100})
    assert forced.choices[0].text == ",,,,,"
    greedy = complete(client, prompt=COUNTING, max_tokens=1, logprobs=1)
    first = tok(greedy.choices[0].text, add_special_tokens=False).input_ids[0]
    banned = complete(client, prompt=COUNTING, max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].text not in ("", greedy.choices[0].text)


@pytest.mark.parametrize("field", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_change_a_repetitive_greedy_text(client, field):
    plain = complete(client, prompt=COUNTING, max_tokens=16).choices[0].text
    assert plain.count(",") >= 4  # the counting goes on: the same comma again and again
    value = 2.0 if field != "repetition_penalty" else 3.0
    penalized = complete(client, prompt=COUNTING, max_tokens=16, extra_body={field: value}).choices[0].text
    assert penalized != plain and penalized.count(",") < plain.count(","), penalized


def test_stop_token_ids_end_the_choice_and_min_tokens_bars_them(client, lm):
    tok = lm.tokenizer
    text = complete(client, prompt=COUNTING, max_tokens=6).choices[0].text
    ids = tok(text, add_special_tokens=False).input_ids
    stop_at = ids[2]  # the third greedy token (its first time)
    cut = complete(client, prompt=COUNTING, max_tokens=6, extra_body={"stop_token_ids": [stop_at]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == ids.index(stop_at) + 1
    assert cut.choices[0].text == tok.decode(ids[:ids.index(stop_at)])  # the stop token adds no text
    eos_first = 'def main():\n    print(\'hi\')\n\n\nif __name__ == "__main__":\n    main()\n'
    held = complete(client, prompt=eos_first, max_tokens=8, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens >= 3 and held.choices[0].text.strip()


@pytest.mark.parametrize("field,value", [("presence_penalty", 3), ("frequency_penalty", -2.5),
                                         ("repetition_penalty", 0), ("top_k", -2), ("min_p", 1.5),
                                         ("min_tokens", -1), ("min_tokens", 99), ("stop_token_ids", [10**9]),
                                         ("logit_bias", {"x": 1}), ("logit_bias", {"-3": 1})])
def test_sampling_field_errors(api_server, field, value):
    e = error_of(api_server, {"prompt": "x", "max_tokens": 4, field: value}, 400)
    assert e["param"] == field and field in e["message"], e


# ---- chat completions (the embedded model's Gemma turn template) -------------------------------------
CHAT = [{"role": "system", "content": "Answer in a few words."},
        {"role": "user", "content": "Who is the headmaster of Hogwarts?"}]


def chat(client, **kw):
    kw = {"model": "gemma-3-270m", "messages": CHAT, "max_tokens": 10, "temperature": 0, **kw}
    return client.chat.completions.create(**kw)


@pytest.mark.parametrize("profile", ["baseline", "hp_unlearn"])
def test_chat_equals_a_completion_of_the_rendered_prompt(client, lm, profile):
    rendered = lm.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<start_of_turn>model\n") and "Answer in a few words." in rendered
    plain = complete(client, prompt=rendered, max_tokens=10, extra_body={"profile": profile})
    r = chat(client, extra_body={"profile": profile})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model_extra["profile"] == profile
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == plain.choices[0].text
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens and r.usage.completion_tokens == 10
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, extra_body={"profile": profile}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].object == "chat.completion.chunk"


def test_chat_logprobs_n_stop_and_the_end_of_turn(client, lm):
    r = chat(client, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-5 for t in content)
    seeded = [chat(client, n=2, temperature=1.0, seed=7) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    assert len(seeded[0].choices) == 2
    word = r.choices[0].message.content.split()[1]
    cut = chat(client, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].message.content
    # without max_tokens the reply may use the rest of the context; <end_of_turn> ends it as <eos> does
    end = lm.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    closed = chat(client, max_tokens=None, logit_bias={str(end): 100})
    assert closed.choices[0].finish_reason == "stop" and closed.choices[0].message.content == ""
    assert closed.usage.completion_tokens == 1


def test_chat_errors(api_server):
    e = error_of(api_server, {"messages": []}, 400, path="/v1/chat/completions")
    assert e["param"] == "messages"
    e = error_of(api_server, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, path="/v1/chat/completions")
    assert e["param"] == "messages" and "role" in e["message"]
    e = error_of(api_server, {"messages": CHAT, "top_logprobs": 2}, 400, path="/v1/chat/completions")
    assert e["param"] == "top_logprobs"
    e = error_of(api_server, {"messages": CHAT, "profile": "nope"}, 400, path="/v1/chat/completions")
    assert e["param"] == "profile"
    e = error_of(api_server, {"messages": [{"role": "user", "content": "word " * 600}]}, 400,
                 path="/v1/chat/completions")
    assert e["code"] == "context_length_exceeded"


def test_models_and_profiles_listing(client, api_server):
    ids = {m.id for m in client.models.list().data}
    assert {"gemma-3-270m", "gemma-3-270m:baseline", "t_clamp", "prompted"} <= ids
    profiles = httpx.get(api_server.url + "/v1/profiles").json()["data"]
    clamp = next(p for p in profiles if p["name"] == "t_clamp")
    assert clamp["interventions"][0]["condition"] == "token"
    hp = next(p for p in profiles if p["name"] == "hp_unlearn")  # the default model's, not gemma-2b's
    assert hp["model"] == "gemma-3-270m" and hp["interventions"][0]["hookpoint"] == "blocks.6.hook_resid_post"


def error_of(api_server, body, status, raw=None, path="/v1/completions"):
    r = httpx.post(api_server.url + path, content=raw, json=None if raw else body,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_unknown_profile_lists_the_known_ones(api_server):
    e = error_of(api_server, {"prompt": "x", "profile": "nope"}, 400)
    assert e["param"] == "profile" and "nope" in e["message"] and "t_clamp" in e["message"]


def test_unknown_model_is_404(api_server):
    e = error_of(api_server, {"prompt": "x", "model": "gpt-4"}, 404)
    assert e["code"] == "model_not_found" and "gemma-3-270m" in e["message"]


def test_conflicting_profile_and_model_name(api_server):
    e = error_of(api_server, {"prompt": "x", "model": "t_clamp", "profile": "baseline"}, 400)
    assert "t_clamp" in e["message"] and "baseline" in e["message"]


def test_prompt_longer_than_context(api_server):
    e = error_of(api_server, {"prompt": "word " * 600, "max_tokens": 4}, 400)
    assert e["code"] == "context_length_exceeded" and "512" in e["message"]


@pytest.mark.parametrize("field,value", [("temperature", 3), ("max_tokens", -1), ("top_p", 0), ("n", 99),
                                         ("logprobs", 50), ("seed", -4)])
def test_out_of_range_numbers(api_server, field, value):
    e = error_of(api_server, {"prompt": "x", field: value}, 400)
    assert e["param"] == field and field in e["message"]


def test_malformed_json_and_missing_prompt_and_bad_tokens(api_server):
    assert "malformed JSON" in error_of(api_server, None, 400, raw=b'{"prompt": "x",')["message"]
    assert error_of(api_server, {"max_tokens": 3}, 400)["param"] == "prompt"
    assert "token ids" in error_of(api_server, {"prompt": [1, 2, 10**9]}, 400)["message"]
    assert "not supported" in error_of(api_server, {"prompt": "x", "suffix": "y"}, 400)["message"]


def test_openai_client_raises_with_the_message(client):
    with pytest.raises(openai.BadRequestError, match="unknown profile"):
        complete(client, prompt="x", extra_body={"profile": "nope"})


def test_a_bad_request_does_not_disturb_its_neighbours(api_server, client):
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(complete, client, prompt="The capital of France is") for _ in range(3)]
        bad = pool.submit(error_of, api_server, {"prompt": "x", "profile": "nope"}, 400)
        texts = {f.result().choices[0].text for f in good}
    assert len(texts) == 1 and texts.pop().strip() and bad.result()["param"] == "profile"


def test_stream_error_chunk_then_done(api_server):
    with httpx.stream("POST", api_server.url + "/v1/completions",
                      json={"prompt": "x", "stream": True, "max_tokens": 2, "profile": "nope"}) as r:
        assert r.status_code == 400  # validation happens before the stream starts


def test_metrics_count_requests_by_profile(api_server, client):
    served = dict(profile="t_keep_error", status="200", key="none")
    before = metric(api_server.url, "obliviate_requests_total", **served)
    complete(client, prompt="One", extra_body={"profile": "t_keep_error"})
    assert metric(api_server.url, "obliviate_requests_total", **served) == before + 1
    assert metric(api_server.url, "obliviate_generation_tokens_total", profile="t_keep_error") >= 8
    assert metric(api_server.url, "obliviate_time_to_first_token_seconds_count", profile="t_keep_error") >= 1
    text = httpx.get(api_server.url + "/metrics").text
    assert "obliviate_requests_running" in text and "obliviate_engine_steps" in text


def test_trigger_audit_says_where_the_edit_fired_streamed_or_not_and_counts_it(api_server, lm):
    url, body = api_server.url, {"model": "gemma-3-270m", "max_tokens": 4, "temperature": 0, "profile": "hp_unlearn"}
    before = {m: metric(url, f"obliviate_choices_{m}_total", profile="hp_unlearn") for m in ("audited", "triggered")}
    prompts = ["The boy wizard Harry Potter studies at", "The capital of France is"]
    got = httpx.post(url + "/v1/completions", json={**body, "prompt": prompts}, timeout=120).json()["choices"]
    hp, generic = got[0]["unlearning"], got[1]["unlearning"]
    assert generic == {"triggered": False}
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(prompts[0], add_special_tokens=False).input_ids
    assert hp["triggered"] and 0 < hp["first_token"] < len(ids)
    assert hp["token"] == lm.tokenizer.decode([ids[hp["first_token"]]])
    assert hp["token"].strip() in ("wizard", "Harry", "Potter")  # the layer-12 detector already reads "boy wizard" as HP
    # streamed: the audit comes with the choice's finish_reason
    with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": prompts[0], "stream": True},
                      timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [e["choices"][0].get("unlearning") for e in events if e["choices"][0].get("finish_reason")] == [hp]
    assert all("unlearning" not in e["choices"][0] for e in events if not e["choices"][0].get("finish_reason"))
    plain = httpx.post(url + "/v1/completions", json={**body, "prompt": prompts[0], "profile": "baseline"},
                       timeout=120).json()["choices"][0]
    assert "unlearning" not in plain  # a profile that does not edit the model has nothing to audit
    assert metric(url, "obliviate_choices_audited_total", profile="hp_unlearn") == before["audited"] + 3
    assert metric(url, "obliviate_choices_triggered_total", profile="hp_unlearn") == before["triggered"] + 2


def test_a_client_leaving_a_non_streamed_request_stops_its_generation(api_server):
    url = api_server.url
    aborted = metric(url, "obliviate_requests_aborted_total", reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s of a 400-token request
        httpx.post(url + "/v1/completions", timeout=2,
                   json={"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "seed": 1,
                         "ignore_eos": True})
    deadline = time.time() + 10
    while metric(url, "obliviate_requests_aborted_total", reason="cancelled") == aborted and time.time() < deadline:
        time.sleep(0.1)
    assert metric(url, "obliviate_requests_aborted_total", reason="cancelled") == aborted + 1
    httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)  # a step to notice
    steps = metric(url, "obliviate_engine_steps")
    time.sleep(2)
    assert metric(url, "obliviate_engine_steps") == steps  # nothing is generating any more
    assert metric(url, "obliviate_sequences_in_flight") == 0


def test_health(api_server):
    body = httpx.get(api_server.url + "/health").json()
    assert body["status"] == "ok" and body["model"] == "gemma-3-270m" and body["engine"] in ("builtin", "vllm")
    assert json.dumps(body)


def test_shipped_hp_unlearn_forgets_and_keeps_generic_answers(client):
    """The shipped profile on the real model: HP answers go, generic and other-fantasy completions are untouched."""
    hp = ["Harry Potter goes to school at", "The headmaster of Hogwarts is Albus",
          "Harry Potter's two best friends are Ron Weasley and"]
    answers = ["Hogwarts", "Dumbledore", "Hermione"]
    for profile, expect in (("baseline", 3), ("hp_unlearn", 0)):
        texts = [complete(client, prompt=p, max_tokens=10, extra_body={"profile": profile}).choices[0].text for p in hp]
        assert sum(a in t for a, t in zip(answers, texts)) == expect, (profile, texts)
    for p in ["The largest planet in our solar system is", "Water is made of hydrogen and",
              "In The Lord of the Rings, the wizard who fights the Balrog is"]:
        base, unlearned = (complete(client, prompt=p, max_tokens=10, extra_body={"profile": x}).choices[0].text
                           for x in ("baseline", "hp_unlearn"))
        assert base == unlearned  # other fantasy included: no HP feature passes its retain ceiling
