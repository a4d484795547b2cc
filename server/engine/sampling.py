"""Next-token choice and logprobs for a batch of rows, each with its own sampling parameters."""

from __future__ import annotations

import torch

from server.engine.base import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B] (CPU); greedy rows take the argmax, others draw with their own
    generator (temperature, then nucleus top-p)."""
    tokens = logits.argmax(-1).cpu()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, -1)
        if p.top_p < 1.0:
            sp, idx = probs.sort(descending=True)
            sp[sp.cumsum(-1) - sp > p.top_p] = 0
            probs = torch.zeros_like(probs).scatter(0, idx, sp)
        tokens[i] = torch.multinomial(probs.cpu(), 1, generator=generators[i])[0]
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: [N, V], tokens: [N] -> each token's logprob and, for k > 0, the top-k alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0].tolist()
    if k <= 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens.tolist(), chosen)]
    top_v, top_i = lp.topk(k, -1)
    return [TokenLogprob(t, c, dict(zip(i, v)))
            for t, c, i, v in zip(tokens.tolist(), chosen, top_i.tolist(), top_v.tolist())]
