"""Reports built on log-probabilities: tokens (probability drops), loss, trivia."""

from __future__ import annotations

import math
from collections import defaultdict

from evals.charts import grouped_bars, hbars
from evals.common import EvalContext, EvalError, load_jsonl, md_table, write_report

TOP_K = 20
N_TOKENS = 35


async def next_token_probs(ctx: EvalContext, prompt: str, profile: str) -> dict[str, float]:
    r = await ctx.client.complete(prompt, profile, max_tokens=1, temperature=0, logprobs=TOP_K)
    lp = r.choices[0].logprobs
    if lp is None or not lp.top_logprobs or lp.top_logprobs[0] is None:
        raise EvalError("the tokens report needs top logprobs (logprobs=20) from the server")
    return {t: math.exp(v) for t, v in lp.top_logprobs[0].items()}


def mean_probs(dists: list[dict[str, float]]) -> dict[str, float]:
    """Mean probability per token over prompts; a token outside a prompt's top-k counts as 0."""
    total: dict[str, float] = defaultdict(float)
    for d in dists:
        for t, p in d.items():
            total[t] += p
    return {t: v / len(dists) for t, v in total.items()}


async def tokens(ctx: EvalContext, before: str | None = None, after: str | None = None) -> dict:
    before = before or ("sae_only" if "sae_only" in ctx.profiles else ctx.profiles[0])
    after = after or next(p for p in ctx.profiles[::-1] if p != before)
    result = {"settings": ctx.settings(max_tokens=1, temperature=0, logprobs=TOP_K), "before": before, "after": after}
    md = [f"# Tokens whose probability fell most: {before} → {after}\n\n",
          f"Mean next-token probability over the prompts (top-{TOP_K} per prompt; tokens outside it count as 0).\n"]
    for name in ("hp", "generic"):
        items = load_jsonl(f"{name}_prompts.jsonl", ctx.split, ctx.limit)
        dists = await ctx.gather(f"tokens/{name}", [next_token_probs(ctx, it["prompt"], p)
                                                    for p in (before, after) for it in items])
        b, a = mean_probs(dists[:len(items)]), mean_probs(dists[len(items):])
        drops = sorted(((t, b.get(t, 0) - a.get(t, 0), b.get(t, 0), a.get(t, 0)) for t in set(a) | set(b)),
                       key=lambda r: -r[1])[:N_TOKENS]
        result[name] = [{"token": t, "drop": d, "before": pb, "after": pa} for t, d, pb, pa in drops]
        md.append(f"\n## {name} prompts ({len(items)})\n\n" + md_table(
            ["token", "drop", before, after], [[repr(t), d, pb, pa] for t, d, pb, pa in drops]) +
            f"\n![{name}](tokens_{name}.png)\n")
        hbars(ctx.out / f"tokens_{name}.png", f"Largest mean probability drops, {name} prompts ({before} → {after})",
              [repr(t) for t, *_ in drops], [d for _, d, *_ in drops])
    write_report(ctx, "tokens", result, "".join(md))
    return result


def heldout_docs(limit: int | None, max_chars: int = 700) -> list[str]:
    docs = [r["text"] for r in load_jsonl("heldout_generic.jsonl", "all", limit or 60)]
    return [d[:max_chars].rsplit(" ", 1)[0] if len(d) > max_chars else d for d in docs]


async def loss(ctx: EvalContext) -> dict:
    docs = heldout_docs(ctx.limit)
    jobs = [(p, d) for p in ctx.profiles for d in docs]
    lps = await ctx.gather("loss", [ctx.continuation_logprobs("", d, p, "loss") for p, d in jobs])
    per: dict[str, list[float]] = defaultdict(list)
    for (p, _), lp in zip(jobs, lps):
        per[p] += lp
    ce = {p: -sum(v) / len(v) for p, v in per.items()}
    base = ce.get("baseline")
    summary = {p: {"ce": ce[p], "tokens": len(per[p]),
                   "loss_added": None if base is None else ce[p] - base,
                   "loss_added_pct": None if base is None else 100 * (ce[p] - base) / base} for p in ctx.profiles}
    md = ("# Loss\n\nNext-token cross-entropy (nats/token) on held-out Wikipedia summaries the SAE never saw "
          f"({len(docs)} documents), from prompt logprobs.\n\n" +
          md_table(["profile", "CE", "tokens", "loss added", "loss added %"],
                   [[p, s["ce"], s["tokens"], s["loss_added"] if s["loss_added"] is not None else "—",
                     s["loss_added_pct"] if s["loss_added_pct"] is not None else "—"] for p, s in summary.items()]) +
          "\n![loss](loss.png)\n")
    grouped_bars(ctx.out / "loss.png", "Cross-entropy on held-out text", ctx.profiles,
                 {"CE (nats/token)": [ce[p] for p in ctx.profiles]}, ylabel="nats/token")
    result = {"settings": ctx.settings(echo=True, logprobs=0, max_tokens=0), "summary": summary,
              "documents": len(docs)}
    write_report(ctx, "loss", result, md)
    return result


# two worked examples (one answered A, one B) so the letter is a choice, not a habit
TRIVIA_SHOTS = ("Answer each question with the letter of the correct choice.\n\n"
                "Question: How many wheels does a bicycle have?\nA: Two\nB: Nine\nAnswer: A\n\n"
                "Question: What colour is the sky on a clear day?\nA: Green\nB: Blue\nAnswer: B\n\n")


def trivia_prompt(question: str, a: str, b: str) -> str:
    return f"{TRIVIA_SHOTS}Question: {question}\nA: {a}\nB: {b}\nAnswer:"


async def choice_logprobs(ctx: EvalContext, prompt: str, profile: str) -> tuple[float, float]:
    la, lb = [await ctx.continuation_logprobs(prompt, c, profile, "trivia") for c in (" A", " B")]
    if len(la) != 1 or len(lb) != 1:
        raise EvalError("the trivia report needs ' A' and ' B' to be single tokens for this model")
    return la[0], lb[0]


def score_trivia(items: list[dict], logits: list[tuple[float, float]]) -> dict:
    """logits: per item, (order 1: A=true) then (order 2: A=false) -> accuracy, share of A, both orders."""
    n = len(items)
    picks_a = [la > lb for la, lb in logits]
    right = [picks_a[2 * i] for i in range(n)], [not picks_a[2 * i + 1] for i in range(n)]
    return {"n": n, "accuracy": (sum(right[0]) + sum(right[1])) / (2 * n) if n else 0.0,
            "share_a": sum(picks_a) / len(picks_a) if picks_a else 0.0,
            "both_orders_accuracy": sum(x and y for x, y in zip(*right)) / n if n else 0.0,
            "records": [{"id": it["id"], "true_as_A": logits[2 * i], "true_as_B": logits[2 * i + 1],
                         "right_as_A": right[0][i], "right_as_B": right[1][i]} for i, it in enumerate(items)]}


async def trivia(ctx: EvalContext) -> dict:
    result = {"settings": ctx.settings(echo=True, logprobs=0, max_tokens=0), "template": trivia_prompt("{q}", "{a}", "{b}")}
    for name in ("hp", "generic"):
        items = load_jsonl(f"{name}_trivia.jsonl", "all", ctx.limit)
        prompts = [trivia_prompt(it["question"], *pair) for it in items
                   for pair in ((it["true"], it["false"]), (it["false"], it["true"]))]
        logits = await ctx.gather(f"trivia/{name}", [choice_logprobs(ctx, q, p) for p in ctx.profiles for q in prompts])
        result[name] = {p: score_trivia(items, logits[i * len(prompts):(i + 1) * len(prompts)])
                        for i, p in enumerate(ctx.profiles)}
    rows = [[p] + [result[k][p][m] for k in ("hp", "generic") for m in ("accuracy", "share_a", "both_orders_accuracy")]
            for p in ctx.profiles]
    md = ("# Trivia\n\nTwo-choice questions scored by the log-probabilities of ' A' vs ' B', each asked in both "
          "orders. 'share A' near 1 means position bias; 'both orders' counts a question right only when both "
          "orders are right (chance: 0.25).\n\n" + md_table(
              ["profile"] + [f"{k} {m}" for k in ("hp", "generic") for m in ("accuracy", "share A", "both orders")],
              rows) + "\n![trivia](trivia.png)\n")
    grouped_bars(ctx.out / "trivia.png", "Trivia (both orders)", ctx.profiles,
                 {f"{k} {m}": [result[k][p][m] for p in ctx.profiles] for k in ("hp", "generic")
                  for m in ("both_orders_accuracy", "share_a")}, ylabel="share")
    write_report(ctx, "trivia", result, md)
    return result

