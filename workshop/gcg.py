"""A GCG search (greedy coordinate gradient, Zou et al. 2023) for adversarial tokens that bring a forgotten
answer back: run offline on CPU against the model with a profile's hooks, replayed over HTTP by the attack
report (evals/attacks.py, family `gcg`).

The tokens go before the prompt ("TOKENS\\nPROMPT"); one set for several prompts (universal), chosen to
maximise the log-probability of each prompt's answer under the profile. Each step: the gradient of that
loss with respect to a one-hot encoding of the tokens gives, per position, the most promising swaps; a
batch of random single swaps among them is scored exactly and the best kept. Only swaps whose text
tokenizes back to the same ids are tried, so the text replayed over HTTP is what was searched.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ablation.adapters import ForwardContext, adapter_hooks
from ablation.hooks import CONTEXT_KWARG, HookContext, ProfileTable
from ablation.residual import residual_hooks
from ablation.spec import ProfileSpec


@dataclass
class Target:
    prompt: str
    answer: str


@dataclass
class GCGResult:
    text: str
    ids: list[int]
    loss: float  # mean answer NLL (nats/token) under the profile, at the end
    start_loss: float  # the same with the starting tokens
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


class ProfiledModel:
    """The model with one profile's hooks: answer losses for a batch of token rows of equal length."""

    def __init__(self, lm, spec: ProfileSpec):
        self.lm, self.model = lm, lm.model
        self.table = ProfileTable({spec.name: spec})
        self.table.check_model(lm.n_layers, lm.model.config.hidden_size)
        self.table.check_adapters(self.model, lm.name)
        self.running = ForwardContext(CONTEXT_KWARG)  # for an adapter profile's linear layers
        self.embed = self.model.get_input_embeddings()
        self.scale = getattr(self.embed, "embed_scale", None)  # Gemma scales its embeddings inside the module

    def losses(self, embeds: torch.Tensor, targets: torch.Tensor, start: int) -> torch.Tensor:
        """embeds: [B, S, d] (unscaled), targets: [B, T] the answer ids at positions start..start+T-1 ->
        [B] mean NLL of the answer per row."""
        b, s, _ = embeds.shape
        x = embeds * self.scale.to(embeds.dtype) if self.scale is not None else embeds
        seq = torch.arange(b).repeat_interleave(s)
        pos = torch.arange(s).repeat(b)
        ctx = HookContext.build(torch.zeros(b * s, dtype=torch.long), seq, pos, {}, embeds.device)
        with residual_hooks(self.model, self.table.layer_hooks()), self.running.installed(self.model.model), \
                adapter_hooks(self.model, self.table.by_module, self.running):
            hidden = self.model.model(inputs_embeds=x, position_ids=pos.view(b, s), use_cache=False,
                                      **{CONTEXT_KWARG: ctx}).last_hidden_state
        t = targets.shape[1]
        logits = self.model.lm_head(hidden[:, start - 1:start - 1 + t])  # only where the answer is predicted
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        logits = torch.tanh(logits / cap) * cap if cap else logits
        logp = torch.log_softmax(logits.float(), -1)
        return -logp.gather(-1, targets[..., None]).squeeze(-1).mean(-1)


def allowed_tokens(tok, limit: int = 20000) -> torch.Tensor:
    """Ids of plain printable tokens (letters, digits, punctuation; no specials, no newlines), the first
    `limit` of them: the search space."""
    special = set(tok.all_special_ids)
    ok = []
    for i in range(min(len(tok), limit * 4)):
        if i in special:
            continue
        s = tok.decode([i])
        if s.strip() and s.isprintable() and s.isascii():
            ok.append(i)
        if len(ok) >= limit:
            break
    return torch.tensor(ok)


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _rows(tok, adv: list[int], t: Target) -> tuple[list[int], list[int], int]:
    """BOS + adv + "\\n" + prompt + " " + answer, the answer ids, and where the answer starts."""
    body = tok("\n" + t.prompt, add_special_tokens=False).input_ids
    ans = tok(" " + t.answer, add_special_tokens=False).input_ids
    ids = _bos(tok) + adv + body
    return ids + ans, ans, len(ids)


def search(lm, spec: ProfileSpec, targets: list[Target], n_tokens: int = 8, steps: int = 20, top_k: int = 64,
           batch: int = 32, seed: int = 0, log=print) -> GCGResult:
    tok = lm.tokenizer
    pm = ProfiledModel(lm, spec)
    rng = random.Random(seed)
    allowed = allowed_tokens(tok)
    adv = tok(" ".join(["!"] * n_tokens), add_special_tokens=False).input_ids[:n_tokens]
    w = pm.embed.weight.detach()
    t0 = time.perf_counter()

    def total(cands: list[list[int]]) -> torch.Tensor:
        out = torch.zeros(len(cands))
        with torch.no_grad():
            for t in targets:
                rows = [_rows(tok, c, t) for c in cands]
                ids = torch.tensor([r[0] for r in rows])
                out += pm.losses(w[ids], torch.tensor([r[1] for r in rows]), rows[0][2])
        return out / len(targets)

    start = float(total([adv])[0])
    best, history = start, [start]
    log(f"gcg: start loss {start:.3f} nats/token over {len(targets)} prompts")
    for step in range(steps):
        grad = torch.zeros(len(adv), w.shape[0])
        for t in targets:  # d loss / d one-hot of the adversarial tokens
            ids, ans, at = _rows(tok, adv, t)
            a0 = len(_bos(tok))  # where the adversarial tokens start
            one_hot = torch.zeros(len(adv), w.shape[0])
            one_hot[torch.arange(len(adv)), torch.tensor(adv)] = 1.0
            one_hot.requires_grad_(True)
            embeds = w[torch.tensor(ids)].clone()
            embeds = torch.cat([embeds[:a0], one_hot @ w, embeds[a0 + len(adv):]])[None]
            pm.losses(embeds, torch.tensor([ans]), at).sum().backward()
            grad += one_hot.grad
        scores = -grad[:, allowed]  # the most promising swaps per position
        top = allowed[scores.topk(min(top_k, len(allowed)), -1).indices]  # [L, k]
        cands = []
        for _ in range(batch * 3):
            if len(cands) >= batch:
                break
            c = list(adv)
            pos = rng.randrange(len(adv))
            c[pos] = int(top[pos, rng.randrange(top.shape[1])])
            if tok(tok.decode(c), add_special_tokens=False).input_ids == c and c != adv:
                cands.append(c)
        if not cands:
            continue
        losses = total(cands)
        i = int(losses.argmin())
        if float(losses[i]) < best:
            best, adv = float(losses[i]), cands[i]
        history.append(best)
        log(f"gcg: step {step + 1}/{steps} loss {best:.3f} {tok.decode(adv)!r}")
    return GCGResult(tok.decode(adv), adv, best, start, history, time.perf_counter() - t0)
