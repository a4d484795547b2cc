"""Next-token choice and logprobs for a batch of rows, each with its own sampling parameters.

The order is vLLM's: logit bias, the min_tokens bar and the penalties change the logits (greedy rows
take the argmax of those); sampled rows then divide by the temperature and keep the tokens that pass
min_p, top_k and top_p before drawing with their own generator.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from server.engine.base import SamplingParams, TokenLogprob


TOP_P_CANDIDATES = 1024  # top_p looks among this many most likely tokens first (a full sort only when they fall short)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           history: Sequence[tuple[list[int], list[int]]] = (), eos_ids: Collection[int] = ()) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B] (CPU). history: each row's (prompt ids, generated ids), needed
    for penalties and min_tokens. `logits` itself is not changed (logprobs are read from it)."""
    logits = processed(logits, params, history, eos_ids)
    tokens = logits.argmax(-1).cpu()
    for i, p in enumerate(params):
        if not p.greedy:
            probs, ids = _kept(logits[i].float() / p.temperature, p)
            pick = draw(probs.cpu(), generators[i])
            tokens[i] = pick if ids is None else ids[pick]
    return tokens


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn in proportion to `probs` (unnormalized, [n]): the inverse of the cumulative sum at a
    uniform draw — what torch.multinomial draws, at a twentieth of its cost over a 262k vocabulary. A token
    of probability 0 is never drawn (its cumulative sum equals its predecessor's)."""
    cum = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cum[-1]
    return min(int(torch.searchsorted(cum, u, right=True)), probs.shape[0] - 1)


def _kept(scaled: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row's tempered logits [V] -> unnormalized probabilities of the tokens min_p, top_k and top_p keep,
    and those tokens' ids (None: the probabilities are over the whole vocabulary, in order)."""
    probs = torch.softmax(scaled, -1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
    if 0 < p.top_k < probs.shape[-1]:
        probs = probs.masked_fill(probs < probs.topk(p.top_k).values[-1], 0)
    if p.top_p < 1.0:
        return _top_p(probs, p.top_p)
    return probs, None


def _top_p(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose mass reaches top_p: (their probabilities, their ids).
    Looked for among the TOP_P_CANDIDATES most likely tokens (a top-k instead of a sort of the vocabulary)
    when those hold more than top_p of the mass, else in the full sort; the same tokens either way."""
    total = probs.sum()
    sp, idx = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]))  # sorted, most likely first
    cum = sp.cumsum(-1) / total
    if cum[-1] <= top_p and sp.shape[-1] < probs.shape[-1]:  # the candidates fall short: every token
        sp, idx = probs.sort(descending=True)
        cum = sp.cumsum(-1) / total
    sp[cum - sp / total > top_p] = 0  # keep the smallest prefix whose mass reaches top_p
    return sp, idx


def processed(logits: torch.Tensor, params: list[SamplingParams], history: Sequence[tuple[list[int], list[int]]],
              eos_ids: Collection[int] = ()) -> torch.Tensor:
    """The logits after each row's logit_bias, min_tokens bar and penalties: the same tensor when no row
    asks for any, else a copy. The penalties run batched over the rows that set them."""
    barred = [i for i, p in enumerate(params) if p.min_tokens and len(history[i][1]) < p.min_tokens]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if not (barred or biased or penalized):
        return logits
    logits = logits.clone()
    dev, vocab = logits.device, logits.shape[-1]
    for i in biased:
        ids, bias = zip(*params[i].logit_bias)
        logits[i, torch.tensor(ids, device=dev)] += torch.tensor(bias, dtype=logits.dtype, device=dev)
    for i in barred:
        stops = set(params[i].stop_token_ids) | set(eos_ids)  # end-of-sequence too under ignore_eos, as in vLLM
        logits[i, torch.tensor(sorted(stops), device=dev)] = float("-inf")
    if penalized:
        rows = torch.tensor(penalized, device=dev)
        sub = logits[rows].float()
        counts = _counts([history[i][1] for i in penalized], vocab, dev)  # [b, V] generated tokens
        seen = (_counts([history[i][0] for i in penalized], vocab, dev) > 0) | (counts > 0)
        col = lambda name: torch.tensor(  # noqa: E731
            [getattr(params[i], name) for i in penalized], device=dev)[:, None]
        rep = col("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= col("frequency_penalty") * counts + col("presence_penalty") * (counts > 0)
        logits[rows] = sub.to(logits.dtype)
    return logits


def _counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Each row's token counts [len(ids), vocab], from one scatter over the padded id lists."""
    width = max(map(len, ids), default=0)
    pad = torch.full((len(ids), width), vocab, dtype=torch.long)  # column `vocab` takes the padding
    for r, row in enumerate(ids):
        pad[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, pad.to(device), torch.ones(pad.shape, device=device))
    return counts[:, :vocab]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: [N, V], tokens: [N] -> each token's logprob and, for k > 0, the top-k alternatives."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0].tolist()
    if k <= 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens.tolist(), chosen)]
    top_v, top_i = lp.topk(k, -1)
    return [TokenLogprob(t, c, dict(zip(i, v)))
            for t, c, i, v in zip(tokens.tolist(), chosen, top_i.tolist(), top_v.tolist())]
