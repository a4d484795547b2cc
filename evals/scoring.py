"""Reports built on log-probabilities: tokens (probability drops), loss, trivia."""

from __future__ import annotations

import math
from collections import defaultdict

from clients.http import APIError
from evals.charts import grouped_bars, hbars
from evals.common import EvalContext, EvalError, load_jsonl, md_table, write_report

TOP_K = 20
N_TOKENS = 35


async def next_token_probs(ctx: EvalContext, prompt: str, profile: str) -> dict[str, float]:
    """The top-k next tokens after `prompt` (chat: the first token of the reply) and their probabilities."""
    if ctx.chat:
        r = await ctx.client.chat([{"role": "user", "content": prompt}], profile, max_tokens=1, temperature=0,
                                  logprobs=True, top_logprobs=TOP_K)
        lp = r.choices[0].logprobs
        if lp is None or not lp.content:
            raise EvalError(f"the tokens report needs top logprobs (top_logprobs={TOP_K}) from the server")
        return {t.token: math.exp(t.logprob) for t in lp.content[0].top_logprobs}
    r = await ctx.client.complete(prompt, profile, max_tokens=1, temperature=0, logprobs=TOP_K)
    lp = r.choices[0].logprobs
    if lp is None or not lp.top_logprobs or lp.top_logprobs[0] is None:
        raise EvalError(f"the tokens report needs top logprobs (logprobs={TOP_K}) from the server")
    return {t: math.exp(v) for t, v in lp.top_logprobs[0].items()}


def mean_probs(dists: list[dict[str, float]]) -> dict[str, float]:
    """Mean probability per token over prompts; a token outside a prompt's top-k counts as 0."""
    total: dict[str, float] = defaultdict(float)
    for d in dists:
        for t, p in d.items():
            total[t] += p
    return {t: v / len(dists) for t, v in total.items()}


def reference_of(profile: str, specs: dict[str, dict], baseline: str = "baseline") -> str | None:
    """What an unlearning profile is compared with, as the study's figure 3 did: `baseline` when every
    intervention keeps the SAE error (only the edited features move the residual), else the plain SAE
    reconstruction at the same hook points (a profile with the same SAEs and no edits); `baseline` for
    an adapter profile without SAE edits. None: not an unlearning profile (no edits, no adapter)."""
    ivs = (specs.get(profile) or {}).get("interventions") or []
    if not any(iv.get("edits") for iv in ivs):
        return baseline if (specs.get(profile) or {}).get("adapter") else None
    if all(iv.get("keep_error") for iv in ivs):
        return baseline
    where = {(iv["hookpoint"], iv["sae"]) for iv in ivs}
    for name, spec in specs.items():
        other = (spec or {}).get("interventions") or []
        if other and not any(iv.get("edits") or iv.get("keep_error") for iv in other) \
                and {(iv["hookpoint"], iv["sae"]) for iv in other} == where:
            return name
    return baseline


async def tokens(ctx: EvalContext) -> dict:
    """For each unlearning profile, the tokens whose probability fell most against its own reference."""
    try:
        specs = {p.name: p.model_dump() for p in (await ctx.client.profiles()).data}
    except APIError:
        specs = {}  # a server without /v1/profiles: compare every profile with the baseline
    pairs = [(ref, p) for p in ctx.profiles if (ref := reference_of(p, specs, ctx.baseline) if specs else
                                                 (ctx.baseline if p != ctx.baseline else None))]
    if not pairs:
        raise EvalError(f"the tokens report needs an unlearning profile (one with edits) among {ctx.profiles}")
    result = {"settings": ctx.settings(max_tokens=1, temperature=0, logprobs=TOP_K),
              "pairs": [{"reference": r, "profile": p} for r, p in pairs]}
    md, tables = [], []
    sets = ctx.prompt_sets()
    for name, items in sets.items():
        needed = sorted({x for pair in pairs for x in pair}, key=lambda p: (p != ctx.baseline, p))
        dists = await ctx.gather(f"tokens/{name}", [next_token_probs(ctx, it["prompt"], p)
                                                    for p in needed for it in items])
        mean = {p: mean_probs(dists[i * len(items):(i + 1) * len(items)]) for i, p in enumerate(needed)}
        for ref, p in pairs:
            b, a = mean[ref], mean[p]
            drops = sorted(((t, b.get(t, 0) - a.get(t, 0), b.get(t, 0), a.get(t, 0)) for t in set(a) | set(b)),
                           key=lambda r: -r[1])[:N_TOKENS]
            result.setdefault(name, {})[p] = {"reference": ref, "n": len(items), "drops": [
                {"token": t, "drop": d, "before": pb, "after": pa} for t, d, pb, pa in drops]}
            chart = f"tokens_{name}_{p}.png"
            tables.append(f"\n## {p} vs {ref}, {name} prompts ({len(items)})\n\n" + md_table(
                ["token", "drop", ref, p], [[repr(t), d, pb, pa] for t, d, pb, pa in drops]) + f"\n![{name}]({chart})\n")
            hbars(ctx.out / chart, f"Largest mean probability drops, {name} prompts ({ref} → {p})",
                  [repr(t) for t, *_ in drops], [d for _, d, *_ in drops])
    for ref, p in pairs:
        tops = [(k, result[k][p]["drops"][0]) for k in ctx.topics.names if result[k][p]["drops"]]
        md.append(f"Under `{p}` (against `{ref}`)" + "".join(
            f" the {k} prompts' largest drop is {top['token']!r} ({top['before']:.3f} → {top['after']:.3f});"
            for k, top in tops) + " the ten largest drops sum to " + ", ".join(
            f"{sum(d['drop'] for d in result[k][p]['drops'][:10]):.3f} on {k}" for k in sets) + " prompts.")
    text = ("# Tokens whose probability fell most\n\n" + " ".join(md) + "\n\nEach unlearning profile against its own "
            "reference: `baseline` when it keeps the SAE error, the plain SAE reconstruction otherwise (so the "
            "reconstruction's own damage is not counted). Mean next-token probability over the prompts (top-"
            f"{TOP_K} per prompt; tokens outside it count as 0).\n" + "".join(tables))
    write_report(ctx, "tokens", result, text)
    return result


REPORT_DOCS = 60  # the loss report reads the first 60 held-out documents; choosing a profile reads the rest


def heldout_docs(limit: int | None, max_chars: int = 700, split: str = "test") -> list[str]:
    """Held-out Wikipedia summaries: split "test" for the loss report (at most REPORT_DOCS), "dev" for
    choosing a profile (the documents after those, so a choice never sees the report's)."""
    if split not in ("test", "dev"):
        raise ValueError(f"held-out documents: split {split!r}, use test or dev")
    rows = load_jsonl("heldout_generic.jsonl")
    rows = rows[:REPORT_DOCS] if split == "test" else rows[REPORT_DOCS:]
    docs = [r["text"] for r in rows[:limit or None]]
    return [d[:max_chars].rsplit(" ", 1)[0] if len(d) > max_chars else d for d in docs]


async def loss(ctx: EvalContext) -> dict:
    docs = heldout_docs(ctx.limit)
    jobs = [(p, d) for p in ctx.profiles for d in docs]
    lps = await ctx.gather("loss", [ctx.continuation_logprobs("", d, p, "loss") for p, d in jobs])
    per: dict[str, list[float]] = defaultdict(list)
    for (p, _), lp in zip(jobs, lps):
        per[p] += lp
    ce = {p: -sum(v) / len(v) for p, v in per.items()}
    base = ce[ctx.baseline]
    summary = {p: {"ce": ce[p], "tokens": len(per[p]),
                   "loss_added": ce[p] - base, "loss_added_pct": 100 * (ce[p] - base) / base} for p in ctx.profiles}
    reading = "; ".join(f"`{p}` {s['loss_added_pct']:+.2f}%" for p, s in summary.items()
                        if p != ctx.baseline)
    md = ("# Loss\n\n" + (f"Against `{ctx.baseline}` ({base:.4f} nats/token over {len(per[ctx.baseline])} tokens), "
                            f"loss added: {reading}. " if reading else "") +
          "Next-token cross-entropy (nats/token) on held-out Wikipedia summaries the SAE never saw "
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
    letters = ("A", "B") if ctx.chat else (" A", " B")  # chat: the assistant's reply is the letter
    la, lb = [await ctx.continuation_logprobs(prompt, c, profile, "trivia") for c in letters]
    if len(la) != 1 or len(lb) != 1:
        raise EvalError(f"the trivia report needs {letters[0]!r} and {letters[1]!r} to be single tokens for this model")
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


def answer_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


async def answer_score(ctx: EvalContext, question: str, answer: str, profile: str) -> float:
    """The answer's log-likelihood as a continuation of the question, per byte of the answer (lm-eval's
    acc_norm): no letters, so no position to be biased towards. Chat: the answer as the reply to the question."""
    prompt, reply = (question, answer) if ctx.chat else (answer_prompt(question), " " + answer)
    lps = await ctx.continuation_logprobs(prompt, reply, profile, "trivia")
    return sum(lps) / len(reply.encode())


def score_continuations(items: list[dict], scores: list[float]) -> dict:
    """scores: per item, (true answer, false answer) -> share of items where the true one scores higher."""
    right = [scores[2 * i] > scores[2 * i + 1] for i in range(len(items))]
    return {"continuation_accuracy": sum(right) / len(items) if items else 0.0,
            "continuation_records": [{"id": it["id"], "true": scores[2 * i], "false": scores[2 * i + 1],
                                      "right": right[i]} for i, it in enumerate(items)]}


async def trivia(ctx: EvalContext) -> dict:
    result = {"settings": ctx.settings(echo=True, logprobs=0, max_tokens=0),
              "template": trivia_prompt("{q}", "{a}", "{b}"), "continuation_template": answer_prompt("{q}") + " {answer}"}
    sets = {**ctx.topics.trivia(ctx.limit), "generic": load_jsonl("generic_trivia.jsonl", "all", ctx.limit)}
    if len(sets) == 1:
        raise EvalError(f"the trivia report needs a trivia set: topic {ctx.topics.title} has none")
    for name, items in sets.items():
        prompts = [trivia_prompt(it["question"], *pair) for it in items
                   for pair in ((it["true"], it["false"]), (it["false"], it["true"]))]
        logits = await ctx.gather(f"trivia/{name} letters", [choice_logprobs(ctx, q, p) for p in ctx.profiles
                                                             for q in prompts])
        scores = await ctx.gather(f"trivia/{name} answers", [answer_score(ctx, it["question"], it[k], p)
                                                             for p in ctx.profiles for it in items
                                                             for k in ("true", "false")])
        n = 2 * len(items)
        result[name] = {p: score_trivia(items, logits[i * n:(i + 1) * n]) | score_continuations(items, scores[i * n:(i + 1) * n])
                        for i, p in enumerate(ctx.profiles)}
    metrics = ("continuation_accuracy", "both_orders_accuracy", "share_a")
    rows = [[p] + [result[k][p][m] for k in sets for m in metrics] for p in ctx.profiles]
    first, topic = ctx.baseline, next(iter(sets))
    share_a = result[topic][first]["share_a"]
    letter, same = ("A", share_a) if share_a >= 0.5 else ("B", 1 - share_a)
    accuracies = lambda p: ", ".join(f"{k} {result[k][p]['continuation_accuracy']:.0%}" for k in sets)  # noqa: E731
    reading = (f"Scored as continuations, `{first}` prefers the true answer on " + accuracies(first) +
               " of the questions; " + "; ".join(f"`{p}`: {accuracies(p)}" for p in ctx.others) +
               f". The letter format mostly measures position: `{first}` answers '{letter}' {same:.0%} of the "
               f"time on {topic} questions (both orders right: {result[topic][first]['both_orders_accuracy']:.0%}, "
               f"chance 25%).")
    after = "as the assistant's reply to the question" if ctx.chat else "after 'Question: …\\nAnswer:'"
    md = ("# Trivia\n\n" + reading + "\n\nTwo-choice questions, scored two ways. **Continuation**: each answer's "
          f"log-likelihood {after}, per byte (as lm-eval's acc_norm); right when the true "
          "answer scores higher (chance 0.5). **Letters** (the 2024 study's format): ' A' vs ' B', each question "
          "asked in both orders; 'share A' near 1 means position bias; 'both orders' counts a question right only "
          "when both orders are right (chance 0.25).\n\n" + md_table(
              ["profile"] + [f"{k} {m}" for k in sets for m in ("continuation", "letters both orders",
                                                                "letters share A")], rows) +
          "\n![trivia](trivia.png)\n")
    grouped_bars(ctx.out / "trivia.png", "Trivia", ctx.profiles,
                 {f"{k} {m}": [result[k][p][m] for p in ctx.profiles] for k in sets
                  for m in ("continuation_accuracy", "both_orders_accuracy")}, ylabel="share")
    write_report(ctx, "trivia", result, md)
    return result
