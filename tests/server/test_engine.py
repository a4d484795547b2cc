"""The built-in engine on the real model, through its interface (generate / abort / stats): per-profile
logprobs against TransformerLens run_with_hooks, KV-cached decoding against full recomputation,
mixed-profile rows joining a running batch, isolation of a failing row, continuous batching."""

import asyncio

import pytest
import torch

from ablation.guard import markup_token_ids
from server.engine.base import EngineError, SamplingParams
from tests.helpers import ablated, collect, prompt, prompt_logprobs, run, transformer_lens_gap

PROMPTS = [
    "Harry Potter studies at",
    "The capital of France is",
    "In the Defence Against the Dark Arts class, Harry felt his scar",
]
MODES = ["baseline", "t_sae_only", "t_zero", "t_keep_error", "t_clamp", "t_sequence", "t_seq_active", "t_steer", "t_dead_clamp",
         "hp_unlearn"]  # shipped: two interventions, two SAEs (layers 6 and 12), each with its own trigger
# fp32 on CPU: HF (SDPA) and TransformerLens differ by ~2e-5 on logits of magnitude ~25 with no hook
# observed, and <= 5e-5 under every test profile (printed by -s).
ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(server):
    """The live server's engine (one engine per model: its hooks are installed once)."""
    return server.app.state.serving.engine


def test_interface_rejects_nothing_it_should_serve_and_reports_stats(engine):
    assert engine.health() and engine.name == "builtin"
    toks, _, _ = run(engine, PROMPTS[1], "baseline", max_tokens=3)
    assert len(toks) == 3
    s = engine.stats()
    assert s.running == 0 and s.waiting == 0 and s.steps > 0


@pytest.mark.parametrize("profile", MODES)
def test_logprobs_match_transformer_lens(engine, tl, table, profile):
    diff = max(transformer_lens_gap(engine, tl, table, text, profile) for text in PROMPTS)
    print(f"{profile:18s} max|Δlogprob| = {diff:.2e}")
    assert diff < ATOL


def test_markup_guard_bans_tag_tokens_once_the_edit_is_on(engine):
    text = "A shopping list in HTML: <ul>\n<li>apples</li>\n<li>pears"
    banned = set(markup_token_ids(engine.tok))
    base, _, _ = run(engine, text, "baseline", max_tokens=8)
    guarded, _, _ = run(engine, text, "t_guard", max_tokens=8)
    assert banned & set(base), engine.tok.decode(base)  # baseline closes its tags
    assert not banned & set(guarded), engine.tok.decode(guarded)


def test_interventions_do_change_logprobs(engine):
    base = prompt_logprobs(engine, PROMPTS[0], "baseline")
    for profile in ["t_sae_only", "t_zero", "t_keep_error", "t_clamp"]:
        other = prompt_logprobs(engine, PROMPTS[0], profile)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(base, other)) > 0.1, profile


@pytest.mark.parametrize("profile", ["t_identity", "t_dead_keep_error", "t_dead_clamp"])
def test_perfect_sae_and_never_firing_ablations_leave_logprobs_unchanged(engine, profile):
    for text in PROMPTS:
        base = prompt_logprobs(engine, text, "baseline")
        other = prompt_logprobs(engine, text, profile)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(base, other)) < 1e-4


@pytest.mark.parametrize("profile", ["baseline", "t_keep_error", "t_sequence", "t_zero", "t_seq_active",
                                     "t_gen_zero", "t_gen_off", "t_steer"])
def test_cached_decoding_matches_full_recomputation(engine, tl, table, profile):
    out, _, _ = run(engine, PROMPTS[0], profile, max_tokens=6)
    ids = [engine.tok.bos_token_id] + engine.tok(PROMPTS[0], add_special_tokens=False).input_ids
    with torch.inference_mode(), ablated(tl, profile, table, n_prompt=len(ids)):  # the rest: generated tokens
        ref = tl(torch.tensor([ids + out]))[0, len(ids) - 1:-1].argmax(-1).tolist()
    assert out == ref


def test_mixed_profile_rows_joining_a_running_batch_equal_running_alone(engine):
    profiles = ["baseline", "t_sae_only", "t_clamp", "t_sequence", "prompted", "t_keep_error"]
    texts = PROMPTS + ["Hermione Granger", "Two plus two equals"]
    jobs = [(p, texts[j % len(texts)], 8 - (j % 3)) for j, p in enumerate(profiles * 2)]
    alone = {(p, t, n): run(engine, t, p, max_tokens=n)[0] for p, t, n in jobs}

    async def staggered():
        async def one(j, p, t, n):
            await asyncio.sleep(0.15 * j)  # later ones join a batch already decoding
            return (await collect(engine, t, p, request_id=f"mix-{j}", max_tokens=n))[0]
        return await asyncio.gather(*(one(j, *job) for j, job in enumerate(jobs)))

    got = asyncio.run(staggered())
    for job, toks in zip(jobs, got):
        assert toks == alone[job], job
    assert len({tuple(t) for t in got}) > 3  # the profiles really differ


def test_short_request_finishes_while_a_long_one_runs(engine):
    """Continuous batching: a 4-token request sent while a 120-token one decodes does not wait for it."""
    async def scenario():
        long_tokens = 0
        short_done_at = None
        started = asyncio.Event()

        async def long():
            nonlocal long_tokens
            params = SamplingParams(max_tokens=120, temperature=1.0, seed=3, ignore_eos=True)
            async for out in engine.generate("long", [prompt(engine, "Once upon a time")], params, "baseline"):
                long_tokens = out.num_generated_tokens
                if long_tokens >= 2:
                    started.set()

        async def short():
            nonlocal short_done_at
            await started.wait()
            toks, _, _ = await collect(engine, PROMPTS[1], "t_sequence", request_id="short", max_tokens=4)
            short_done_at = long_tokens
            return toks

        _, toks = await asyncio.gather(long(), short())
        return toks, short_done_at, long_tokens

    toks, at, total = asyncio.run(scenario())
    assert len(toks) == 4 and at is not None
    assert at < 60, f"the short request finished only when the long one had {at} tokens"
    print(f"short request done when the long one had {at} of {total} tokens")


def test_leaving_early_aborts_and_frees_the_row(engine):
    async def scenario():
        params = SamplingParams(max_tokens=150, temperature=1.0, seed=1, ignore_eos=True)
        gen = engine.generate("abandon", [prompt(engine, PROMPTS[0])], params, "t_sae_only")
        async for out in gen:
            if out.num_generated_tokens >= 2:
                break
        await gen.aclose()
        for _ in range(100):
            if engine.stats().running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(scenario())
    assert run(engine, PROMPTS[1], "baseline", max_tokens=2)[0]  # and the engine goes on serving


class Broken:
    """An SAE whose encode fails, standing in for any per-profile failure (bad weights, OOM)."""
    dtype = torch.float32

    def encode(self, x):
        raise RuntimeError("broken SAE")


def test_a_failing_row_does_not_fail_its_batch_mates(engine, monkeypatch):
    entry = next(e for entries in engine.table.by_hook.values() for e in entries
                 if e.profile == engine.table.index["t_zero"])
    monkeypatch.setattr(entry, "sae", Broken())

    async def both():
        return await asyncio.gather(collect(engine, PROMPTS[0], "baseline", request_id="good", max_tokens=4),
                                    collect(engine, PROMPTS[0], "t_zero", request_id="bad", max_tokens=4),
                                    return_exceptions=True)

    good, bad = asyncio.run(both())
    assert len(good[0]) == 4
    assert isinstance(bad, EngineError) and "broken SAE" in str(bad)


class FailsAfter:
    """An SAE that works for its first `ok` encodes, then fails: a fault that strikes mid-decode."""

    def __init__(self, sae, ok: int):
        self.sae, self.ok = sae, ok

    def __getattr__(self, name):
        return getattr(self.sae, name)

    def encode(self, x):
        self.ok -= 1
        if self.ok < 0:
            raise RuntimeError("SAE failed mid-decode")
        return self.sae.encode(x)


def test_a_row_failing_mid_decode_does_not_fail_its_batch_mates(engine, monkeypatch):
    entry = next(e for entries in engine.table.by_hook.values() for e in entries
                 if e.profile == engine.table.index["t_zero"])
    monkeypatch.setattr(entry, "sae", FailsAfter(entry.sae, ok=2))  # prefill and one decode step

    async def both():
        return await asyncio.gather(collect(engine, PROMPTS[1], "baseline", request_id="good2", max_tokens=6),
                                    collect(engine, PROMPTS[1], "t_zero", request_id="bad2", max_tokens=6),
                                    return_exceptions=True)

    good, bad = asyncio.run(both())
    assert good[0] == run(engine, PROMPTS[1], "baseline", max_tokens=6)[0]  # all 6 tokens, as when alone
    assert isinstance(bad, EngineError) and "mid-decode" in str(bad)
    assert engine.health()
