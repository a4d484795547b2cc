"""The steering direction of `obliviate unlearn --steer-replies FILE`: from where the model's residual is
when it answers the forget prompts to where it is when it gives one of the replies in FILE instead (what
a model that never knew the topic says: "I'm not sure…" for an assistant).

    direction = mean residual (layer L, at the positions that predict each reply token) over every given
                reply after every forget dev prompt
              - the same mean over the model's own greedy replies to those prompts

A profile adds `scale` x its unit vector from the edit's trigger on (ablation/edit.py); the candidates'
scales are fractions of the gap between the two means (`gap`), so they mean the same on any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workshop.activations import residual_batches

REPLY_TOKENS = 32  # the model's own replies: as many tokens as the chat evals read
BATCH = 16


@dataclass(frozen=True)
class Direction:
    vector: torch.Tensor  # [d_model] fp32: the difference of the means (not normalised)
    replies: int  # replacement replies given
    prompts: int  # forget prompts they were put after

    @property
    def gap(self) -> float:
        return float(self.vector.norm())


def prompt_ids(lm, prompt: str, chat: bool) -> list[int]:
    """The prompt as the server sends it to the model: BOS + text, or (chat) the user's message rendered with
    the model's template and the assistant's turn opened (one BOS)."""
    tok = lm.tokenizer
    if not chat:
        return [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


@torch.inference_mode()
def own_replies(lm, prompts: list[list[int]], max_tokens: int = REPLY_TOKENS) -> list[list[int]]:
    """The model's greedy continuation of each prompt (stopping at its end-of-turn tokens)."""
    out = []
    for ids in prompts:
        gen = lm.model.generate(torch.tensor([ids], device=lm.device), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=list(lm.eos_ids), pad_token_id=lm.tokenizer.pad_token_id or 0)
        reply = [t for t in gen[0, len(ids):].tolist() if t not in lm.eos_ids]
        out.append(reply or gen[0, len(ids):].tolist())
    return out


def mean_reply_residual(lm, layer: int, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """[d_model]: the mean residual after decoder layer `layer` over the positions that predict each reply's
    tokens (the prompt's last token up to the reply's second-to-last), over all (prompt, reply) pairs."""
    total, count = None, 0
    rows = [p + r for p, r in pairs]
    for i, (_, acts) in enumerate(residual_batches(lm, rows, [layer], BATCH, "steering")):
        for j, h in enumerate(acts[layer]):
            p, r = pairs[BATCH * i + j]
            part = h[len(p) - 1:len(p) + len(r) - 1].sum(0)
            total = part if total is None else total + part
            count += len(r)
    return total / count


def direction(lm, layer: int, prompts: list[str], replies: list[str], chat: bool) -> Direction:
    """The steering direction at `layer` from the model's own answers to `prompts` towards `replies`."""
    ids = [prompt_ids(lm, p, chat) for p in prompts]
    own = own_replies(lm, ids)
    lead = "" if chat else " "  # a completion's reply continues the prompt's text
    given = [lm.tokenizer(lead + r.strip(), add_special_tokens=False).input_ids for r in replies]
    away = mean_reply_residual(lm, layer, [(p, r) for p, r in zip(ids, own) if r])
    towards = mean_reply_residual(lm, layer, [(p, r) for p in ids for r in given])
    return Direction(towards - away, len(replies), len(prompts))
