"""Scoring candidate profiles over HTTP on the dev split: answers kept per prompt set, the fluency of the
forget completions, and cross-entropy on held-out documents (what `obliviate unlearn` chooses by)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clients.http import AsyncClient
from evals.common import EvalContext
from evals.generation import score_items, tally
from evals.scoring import heldout_docs


@dataclass
class Scores:
    """One profile on the dev split: correct greedy answers per prompt set, the fluency of its forget
    completions (nats/token under baseline; None without a forget set), CE on held-out documents."""
    answers: dict[str, int] = field(default_factory=dict)
    fluency: float | None = None
    ce: float = 0.0


async def score(url: str, profiles: list[str], sets: dict[str, list[dict]], n_docs: int,
                chat: bool = False) -> dict[str, Scores]:
    """Scores of each profile over HTTP: answers in each prompt set ({prompt, answers} items; chat: asked
    as a user's message), the fluency of its `forget` completions (evals.generation), and CE on n_docs
    held-out documents."""
    client = AsyncClient(url, concurrency=8)
    ctx = EvalContext(client, profiles, Path("."), split="dev", chat=chat)
    out = {p: Scores() for p in profiles}
    try:
        for name, items in sets.items():
            recs = await score_items(ctx, items, f"dev/{name}", with_prob=False, with_fluency=name == "forget")
            for p in profiles:
                t = tally(recs[p])
                out[p].answers[name] = t["correct"]
                if name == "forget":
                    out[p].fluency = t["mean_fluency"]
        docs = heldout_docs(n_docs, split="dev")
        for p in profiles:
            lps = await ctx.gather(f"ce/{p}", [ctx.continuation_logprobs("", d, p, "loss") for d in docs])
            flat = [v for lp in lps for v in lp]
            out[p].ce = -sum(flat) / len(flat)
    finally:
        await client.aclose()
    return out
