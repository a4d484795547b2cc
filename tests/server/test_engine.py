"""The engine on the real model: per-profile logits against TransformerLens run_with_hooks,
KV-cached decoding against full recomputation, and mixed-batch isolation."""

import pytest
import torch

from ablation.hooks import ablated
from server.engine import Engine, SamplingParams, Sequence

PROMPTS = [
    "Harry Potter studies at",
    "The capital of France is",
    "In the Defence Against the Dark Arts class, Harry felt his scar",
]
MODES = ["baseline", "t_sae_only", "t_zero", "t_keep_error", "t_clamp", "t_sequence", "t_dead_clamp"]
# fp32 on CPU: HF (SDPA) and TransformerLens differ by ~2e-5 on logits of magnitude ~25 with no hook
# observed, and <= 5e-5 under every test profile (printed by -s).
ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(lm, table):
    e = Engine(lm, table, max_batch_size=8)
    yield e
    e.shutdown()


def seqs_for(engine, prompts, profile, max_tokens=0, **params):
    tok = engine.tok
    return [Sequence([tok.bos_token_id], tok(p, add_special_tokens=False).input_ids,
                     engine.table.index[profile], SamplingParams(max_tokens=max_tokens, temperature=0, **params),
                     emit=lambda ev: None) for p in prompts]


@torch.inference_mode()
def engine_last_logits(engine, seqs):
    engine.state.begin([s.profile for s in seqs], engine.lm.device)
    try:
        hidden, *_ = engine.prefill(seqs)
        return engine.logits(hidden)
    finally:
        engine.state.end()


def run(engine, seqs):
    for s in seqs:
        s.text = None
    engine.submit(seqs)  # sets text streams and generators
    engine.waiting.clear()
    engine.generate(seqs)
    return [[t.token_id for t in s.out] for s in seqs]


@pytest.mark.parametrize("profile", MODES)
def test_next_token_logits_match_transformer_lens(engine, tl, table, profile):
    for prompt in PROMPTS:
        ours = engine_last_logits(engine, seqs_for(engine, [prompt], profile))[0]
        ids = torch.tensor([[engine.tok.bos_token_id] + engine.tok(prompt, add_special_tokens=False).input_ids])
        with torch.inference_mode(), ablated(tl, table.specs[profile], table):
            ref = tl(ids)[0, -1]
        diff = (ours - ref).abs().max().item()
        print(f"{profile:18s} max|Δlogit| = {diff:.2e}")
        assert diff < ATOL
        assert ours.argmax() == ref.argmax()


def test_interventions_do_change_logits(engine):
    base = engine_last_logits(engine, seqs_for(engine, PROMPTS, "baseline"))
    for profile in ["t_sae_only", "t_zero", "t_keep_error", "t_clamp"]:
        other = engine_last_logits(engine, seqs_for(engine, PROMPTS, profile))
        assert (other - base).abs().max() > 0.1, profile


@pytest.mark.parametrize("profile", ["t_identity", "t_dead_keep_error", "t_dead_clamp"])
def test_perfect_sae_and_never_firing_ablations_leave_logits_unchanged(engine, profile):
    base = engine_last_logits(engine, seqs_for(engine, PROMPTS, "baseline"))
    other = engine_last_logits(engine, seqs_for(engine, PROMPTS, profile))
    torch.testing.assert_close(other, base, rtol=0, atol=1e-4)


@pytest.mark.parametrize("profile", ["baseline", "t_keep_error", "t_sequence", "t_zero"])
def test_cached_decoding_matches_full_recomputation(engine, tl, table, profile):
    out = run(engine, seqs_for(engine, PROMPTS[:1], profile, max_tokens=6))[0]
    prompt = [engine.tok.bos_token_id] + engine.tok(PROMPTS[0], add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + out])
    with torch.inference_mode(), ablated(tl, table.specs[profile], table):
        ref = tl(ids)[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == ref


def test_mixed_batch_rows_equal_running_alone(engine):
    profiles = ["baseline", "t_sae_only", "t_clamp", "t_sequence", "prompted", "t_keep_error"]
    prompts = PROMPTS + ["Hermione Granger", "Two plus two equals"]
    alone = {}
    for p in profiles:
        for i, prompt in enumerate(prompts):
            alone[p, i] = run(engine, seqs_for(engine, [prompt], p, max_tokens=8, stop=()))[0]
    mixed = []
    for j, p in enumerate(profiles):  # every profile, prompts of different lengths, one batch
        i = j % len(prompts)
        mixed += [(p, i, seqs_for(engine, [prompts[i]], p, max_tokens=8 - (j % 3))[0])]
    got = run(engine, [s for *_, s in mixed])
    for (p, i, s), toks in zip(mixed, got):
        assert toks == alone[p, i][: s.params.max_tokens], (p, i)
    assert len({tuple(t) for t in got}) > 3  # the profiles really differ


class Broken:
    """An SAE whose encode fails, standing in for any per-profile failure (bad weights, OOM)."""
    dtype = torch.float32

    def encode(self, x):
        raise RuntimeError("broken SAE")


def test_a_failing_row_does_not_fail_its_batch_mates(engine, monkeypatch):
    entry = next(e for e in engine.table.by_hook["blocks.6.hook_resid_post"]
                 if e.profile == engine.table.index["t_zero"])
    monkeypatch.setattr(entry, "sae", Broken())
    events = {}
    good, bad = seqs_for(engine, PROMPTS[:1], "baseline", 4) + seqs_for(engine, PROMPTS[:1], "t_zero", 4)
    for name, s in (("good", good), ("bad", bad)):
        s.emit = lambda ev, name=name: events.setdefault(name, []).append(ev["type"])
    engine.submit([good, bad])
    engine.waiting.clear()
    engine.run_isolated([good, bad])
    assert events["good"][-1] == "done" and len(good.out) == 4
    assert events["bad"] == ["error"]
