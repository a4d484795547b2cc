"""Builders for tests: seeded random SAEs of every architecture, saved in sae_lens format, profile
files that point at them (never shipped as served profiles), and the TransformerLens reference."""

from __future__ import annotations

import asyncio

from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import yaml
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from ablation.hooks import HookContext, ProfileTable, ResidualHook
from ablation.sae_io import sae_dims, save_direction
from server.engine.base import Prompt, SamplingParams

ALL_ARCHITECTURES = ["standard", "jumprelu", "topk"]
HOOKPOINT = "blocks.6.hook_resid_post"
DEAD = [3, 7]  # features built never to fire


def build_sae(arch: str, d_in: int, d_sae: int = 256, seed: int = 0, scale: float = 1.0):
    """A random SAE whose features fire on a share of tokens; features in DEAD never fire."""
    g = torch.Generator().manual_seed(seed)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T / scale)
        sae.b_enc.copy_(torch.zeros(d_sae))
        sae.b_enc[DEAD] = -1e30
        if arch == "jumprelu":
            sae.threshold.copy_(torch.full((d_sae,), 0.5))
    return sae


def identity_sae(d_in: int) -> StandardSAE:
    """acts = [relu(x), relu(-x)], decode = relu(x) - relu(-x) = x: a perfect reconstruction."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def save_sae(sae, path: Path, hookpoint: str = HOOKPOINT) -> Path:
    sae.cfg.metadata.hook_name = hookpoint
    sae.save_model(path)
    return path


def write_profile(dir: Path, name: str, sae_dir: Path, hookpoint: str = HOOKPOINT, markup_guard: bool = False,
                  model: str = "gemma-3-270m", **iv) -> Path:
    if "steer" in iv and not (dir / iv["steer"]["vector"]).exists():  # a seeded random direction
        d_in, _ = sae_dims(str(sae_dir))
        save_direction(torch.randn(d_in, generator=torch.Generator().manual_seed(2)), dir / iv["steer"]["vector"])
    spec = {"name": name, "description": f"test profile {name}", "model": model, "markup_guard": markup_guard,
            "interventions": [{"hookpoint": hookpoint, "sae": str(sae_dir), **iv}]}
    path = dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# profile name -> intervention fields (besides hookpoint and sae); the random SAE is "standard"
TEST_PROFILES = {
    "t_sae_only": {},
    "t_zero": {"edits": [{"feature": 1, "value": 0.0}, {"feature": 2, "value": 0.0}]},
    "t_keep_error": {"keep_error": True, "edits": [{"feature": 1, "value": 0.0}, {"feature": 2, "value": 0.0}]},
    "t_clamp": {"keep_error": True, "condition": "token",
                "edits": [{"feature": 1, "value": -40.0}, {"feature": 2, "value": -40.0}]},
    "t_sequence": {"keep_error": True, "condition": "sequence",
                   "edits": [{"feature": 1, "value": -40.0}, {"feature": 5, "value": -40.0}]},
    "t_seq_active": {"keep_error": True, "condition": "sequence_active",
                     "edits": [{"feature": 1, "value": -40.0}, {"feature": 5, "value": -40.0}]},
    "t_gen_zero": {"keep_error": True, "condition": "sequence", "generated": "zero",
                   "edits": [{"feature": 1, "value": -40.0}, {"feature": 5, "value": -40.0}]},
    # the sequence clamp plus a steering vector from the trigger on (written by write_profile)
    "t_steer": {"keep_error": True, "condition": "sequence", "generated": "zero",
                "edits": [{"feature": 1, "value": -40.0}, {"feature": 5, "value": -40.0}],
                "steer": {"vector": "steer.safetensors", "scale": 20.0}},
    "t_gen_off": {"keep_error": True, "condition": "sequence", "generated": "off",
                  "edits": [{"feature": 1, "value": -40.0}, {"feature": 5, "value": -40.0}]},
    # switches on at once (features 1 and 5 fire on every token) and changes little (zeroed, error kept)
    "t_guard": {"keep_error": True, "condition": "sequence", "markup_guard": True,
                "edits": [{"feature": 1, "value": 0.0}, {"feature": 5, "value": 0.0}]},
    "t_dead_keep_error": {"keep_error": True, "edits": [{"feature": f, "value": 0.0} for f in DEAD]},
    "t_dead_clamp": {"keep_error": True, "condition": "token",
                     "edits": [{"feature": f, "value": -1000.0} for f in DEAD]},
}


@contextmanager
def ablated(tl_model, profile: str, table: ProfileTable, n_prompt: int | None = None):
    """One profile applied to a TransformerLens HookedTransformer (BOS at position 0 of every row), by
    the same hook function the engines run: the reference their logits are checked against. n_prompt:
    the positions before it are the prompt, those from it generated tokens (None: all are prompt)."""
    idx = table.index[profile]
    try:
        for hp, entries in table.by_hook.items():
            mine = [e for e in entries if e.profile == idx]
            if not mine:
                continue
            if hp.name not in tl_model.hook_dict:
                raise ValueError(f"hookpoint {hp} not found in the model")

            def fn(x, hook, residual_hook=ResidualHook(hp, mine), hp=hp):  # x: [B, S, d]
                B, S = x.shape[:2]
                pos = torch.arange(S).repeat(B)
                ctx = HookContext.build(torch.full((B * S,), idx), torch.arange(B).repeat_interleave(S), pos,
                                        {hp: torch.zeros(B, dtype=torch.bool)}, x.device,
                                        None if n_prompt is None else pos < n_prompt)
                return residual_hook(x, ctx)
            tl_model.add_hook(hp.name, fn)
        yield tl_model
    finally:
        tl_model.reset_hooks()


def metric(url: str, name: str, **labels) -> float:
    """The sum of a /metrics sample over the series whose labels include `labels` (0 if none)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def staggered_texts(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> list[str]:
    """Greedy texts of (profile, prompt) jobs sent together, each 50 ms after the one before (so later ones
    join a running batch)."""
    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            async def one(j, p, prompt):
                await asyncio.sleep(0.05 * j)
                r = await http.post("/v1/completions", json={"prompt": prompt, "profile": p, "max_tokens": max_tokens,
                                                              "temperature": 0})
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(j, *job) for j, job in enumerate(jobs)))
    return asyncio.run(together())


# The built-in engine through its interface (generate), for the engine and model tests.
def prompt(engine, text: str) -> Prompt:
    return Prompt([engine.tok.bos_token_id], engine.tok(text, add_special_tokens=False).input_ids)


async def collect(engine, text, profile, request_id=None, **params):
    """-> (token ids, prompt logprobs, token logprobs) of one greedy choice."""
    params = SamplingParams(**{"max_tokens": 0, "temperature": 0, **params})
    tokens, prompt_lp, finish = [], None, None
    async for out in engine.generate(request_id or f"t-{id(params)}-{text}", [prompt(engine, text)], params, profile):
        tokens += out.tokens
        prompt_lp = out.prompt_logprobs or prompt_lp
        finish = out.finish_reason or finish
    assert finish in ("stop", "length")
    return [t.token_id for t in tokens], prompt_lp, tokens


def run(engine, text, profile, **params):
    return asyncio.run(collect(engine, text, profile, **params))


def prompt_logprobs(engine, text, profile):
    """[L, 1 + 20]: each prompt token's logprob and its top-20 alternatives' (the engine's view)."""
    _, lp, _ = run(engine, text, profile, logprobs=20, prompt_logprobs=True)
    return lp


def transformer_lens_gap(engine, tl_model, table: ProfileTable, text: str, profile: str) -> float:
    """The largest |logprob difference| between the engine's prompt logprobs of `text` under `profile` (each
    token's and its top-20 alternatives') and TransformerLens run with the same hook; asserts the engine's
    top token is the reference's at every position."""
    ours = prompt_logprobs(engine, text, profile)
    ids = [engine.tok.bos_token_id] + engine.tok(text, add_special_tokens=False).input_ids
    with torch.inference_mode(), ablated(tl_model, profile, table):
        ref = torch.log_softmax(tl_model(torch.tensor([ids]))[0].float(), -1)  # [L, V]
    diff = 0.0
    for pos, info in enumerate(ours, start=1):  # info: the token at `pos`, predicted at pos - 1
        diff = max(diff, abs(info.logprob - ref[pos - 1, info.token_id].item()))
        for t, v in info.top.items():
            diff = max(diff, abs(v - ref[pos - 1, t].item()))
        assert max(info.top, key=info.top.get) == int(ref[pos - 1].argmax()), (profile, text, pos)
    return diff
