"""Reports built on greedy completions: completions (side by side), familiarity, robustness."""

from __future__ import annotations

import math
import re
from collections import Counter

from evals.charts import grouped_bars
from evals.common import EvalContext, EvalError, is_correct, md_table, write_report

MAX_TOKENS = 10
CHAT = ", each prompt asked as a user's chat message (the answer probability is not measured)"
# a stray HTML/XML tag: <em>, </strong>, <br/>, <div class="x">
MARKUP = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")


def has_markup(text: str) -> bool:
    return bool(MARKUP.search(text))


def repeats(text: str, n: int = 3, times: int = 3) -> bool:
    """Degenerate repetition: some word n-gram occurs `times` times or more in the text."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


async def score_items(ctx: EvalContext, items: list[dict], desc: str, with_prob: bool = True,
                      with_fluency: bool = True) -> dict:
    """Per profile and item: the greedy completion, whether it is correct, whether it mentions a topic
    being forgotten (its lexicon), the probability of the first token of the first accepted answer, and
    the completion's fluency: the mean log-probability the first profile (baseline) gives its tokens after
    the first. Junk such as "</strong> </strong>" scores far lower than a wrong but plausible answer,
    whose first token alone is unlikely."""
    lex = ctx.topics.lexicon()
    jobs = [(p, it) for p in ctx.profiles for it in items]
    n = ctx.max_tokens(MAX_TOKENS)
    texts = await ctx.gather(f"{desc}: completions", [ctx.greedy(it["prompt"], p, n) for p, it in jobs])
    probs, fluency = [None] * len(jobs), [None] * len(jobs)
    if with_prob and not ctx.chat:  # an assistant's first token is rarely the answer: no P(answer) in chat
        lps = await ctx.gather(f"{desc}: answer probabilities", [
            ctx.continuation_logprobs(it["prompt"], " " + it["answers"][0], p, "familiarity") for p, it in jobs])
        probs = [math.exp(lp[0]) if lp else None for lp in lps]
    if with_fluency:
        lps = await ctx.gather(f"{desc}: fluency", [
            ctx.continuation_logprobs(it["prompt"], text, ctx.baseline, "familiarity")
            for (_, it), text in zip(jobs, texts)])
        fluency = [sum(lp[1:]) / len(lp[1:]) if len(lp) > 1 else None for lp in lps]
    records: dict[str, list[dict]] = {p: [] for p in ctx.profiles}
    for (p, it), text, prob, flu in zip(jobs, texts, probs, fluency):
        records[p].append({"id": it["id"], "prompt": it["prompt"], "answers": it["answers"], "completion": text,
                           "correct": is_correct(text, it["answers"]), "mentions_topic": bool(lex.search(text)),
                           "answer_prob": prob, "fluency": flu, "markup": has_markup(text), "repeats": repeats(text),
                           **{k: it[k] for k in ("set", "lang", "domain") if k in it}})
    return records


def mean_of(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def tally(records: list[dict]) -> dict:
    n = len(records) or 1
    return {"n": len(records), "correct": sum(r["correct"] for r in records),
            "correct_rate": sum(r["correct"] for r in records) / n,
            "mention_rate": sum(r["mentions_topic"] for r in records) / n,
            "mean_answer_prob": mean_of(records, "answer_prob"), "mean_fluency": mean_of(records, "fluency"),
            "markup_rate": sum(r["markup"] for r in records) / n, "repeat_rate": sum(r["repeats"] for r in records) / n}


def reading(ctx: EvalContext, summary: dict, what: str) -> str:
    """One paragraph that reads the table: correct answers per prompt set, each profile against the baseline,
    the sets of the topics being forgotten first."""
    profiles, first, forget = ctx.profiles, ctx.baseline, ctx.topics.names
    sets = list(summary)
    count = lambda k, p: f"{summary[k][p]['correct']}/{summary[k][p]['n']}"  # noqa: E731
    sizes = ", ".join(f"{summary[k][first]['n']} {k}" for k in sets)
    parts = [f"{what} on {sizes} prompts. `{first}` answers " + ", ".join(f"{count(k, first)} {k}" for k in sets)
             + " correctly"]
    for p in ctx.others:
        parts.append(f"`{p}`: " + ", ".join(f"{k} {count(k, p)}" for k in sets))
    forget = [k for k in forget if k in summary]
    if forget and len(profiles) > 1:
        rate = lambda k, p: f"{summary[k][p]['correct_rate']:.0%}"  # noqa: E731
        best = min(ctx.others, key=lambda p: sum(summary[k][p]["correct_rate"] for k in forget))
        kept = [f"{k} {rate(k, best)} of answers vs {rate(k, first)}" for k in sets if k not in forget]
        parts.append(f"the fewest {'/'.join(forget)} answers are left under `{best}` ("
                     + ", ".join(f"{k} {rate(k, best)} vs {rate(k, first)}" for k in forget) + ")"
                     + (", with " + ", ".join(kept) if kept else ""))
    return "; ".join(parts) + "."


def robustness_reading(ctx: EvalContext, leak: dict) -> str:
    profiles, first = ctx.profiles, ctx.baseline
    text = ", ".join(f"`{p}` {leak[p]:.0%}" for p in profiles)
    worst = max(ctx.others, key=lambda p: leak[p], default=None)
    out = f"Mean correct rate over the adversarial sets (the leak): {text}."
    if worst is not None and leak[first]:
        out += f" The most leaky after `{first}` is `{worst}`, keeping {leak[worst] / leak[first]:.0%} of its answers."
    return out


async def completions(ctx: EvalContext) -> dict:
    sets = ctx.prompt_sets()
    out = {k: await score_items(ctx, v, f"completions/{k}", with_prob=False, with_fluency=False)
           for k, v in sets.items()}
    summary = {k: {p: tally(r[p]) for p in ctx.profiles} for k, r in out.items()}
    md = ["# Completions\n\n", reading(ctx, summary, "Greedy completions") + "\n\n",
          f"Greedy, {ctx.max_tokens(MAX_TOKENS)} new tokens{CHAT if ctx.chat else ''}. "
          "✓ = an accepted answer appears.\n"]
    for k, recs in out.items():
        md.append(f"\n## {k} prompts\n")
        rows = []
        for i, it in enumerate(sets[k]):
            rows.append([it["prompt"], "/".join(it["answers"])] +
                        [("✓ " if recs[p][i]["correct"] else "") + recs[p][i]["completion"].strip() for p in ctx.profiles])
        md.append(md_table(["prompt", "expected"] + ctx.profiles, rows))
    result = {"settings": ctx.settings(max_tokens=ctx.max_tokens(MAX_TOKENS), temperature=0), "records": out,
              "summary": summary}
    write_report(ctx, "completions", result, "".join(md))
    return result


async def familiarity(ctx: EvalContext) -> dict:
    sets = ctx.prompt_sets(nearby=True)
    recs = {k: await score_items(ctx, v, f"familiarity/{k}") for k, v in sets.items()}
    summary = {k: {p: tally(r[p]) for p in ctx.profiles} for k, r in recs.items()}
    cols = ("correct_rate", "mention_rate", "mean_answer_prob", "mean_fluency")
    rows = [[p] + [summary[k][p][m] for k in sets for m in cols] for p in ctx.profiles]
    header = ["profile"] + [f"{k} {m}" for k in sets for m in ("correct", "mentions topic", "P(answer)", "fluency")]
    sentence, fluency = fluency_table(ctx, summary, list(sets))
    opening = reading(ctx, summary, "Familiarity") + " " + sentence
    md = ("# Familiarity\n\n" + opening +
          "\n\nShare of prompts answered correctly (an accepted answer in the greedy "
          f"{ctx.max_tokens(MAX_TOKENS)}-token completion{CHAT if ctx.chat else ''}), share of completions that "
          f"mention {ctx.topics.title} (lexicon), the "
          "mean probability of the accepted answer's first token, and fluency: the mean log-probability (nats per "
          f"token) `{ctx.baseline}` gives each completion after its first token — forgetting that leaves junk "
          "text (stray markup, repeats) shows as a fall here, a plausible wrong answer hardly.\n\n" +
          md_table(header, rows) +
          "\n![familiarity](familiarity.png)\n\n" + fluency)
    grouped_bars(ctx.out / "familiarity.png", "Familiarity by profile", ctx.profiles,
                 {f"{k} correct": [summary[k][p]["correct_rate"] for p in ctx.profiles] for k in sets}
                 | {f"{k} mentions": [summary[k][p]["mention_rate"] for p in ctx.profiles] for k in ctx.topics.names},
                 ylabel="share")
    result = {"settings": ctx.settings(max_tokens=ctx.max_tokens(MAX_TOKENS), temperature=0), "summary": summary,
              "records": recs}
    write_report(ctx, "familiarity", result, md)
    return result


ADVERSARIAL = ("paraphrase", "language", "jailbreak", "relearning")
FLUENCY = ("mean_fluency", "markup_rate", "repeat_rate")


def fluency_table(ctx: EvalContext, summary: dict, sets: list[str]) -> tuple[str, str]:
    """(a sentence naming the profile whose forget completions read most like baseline's, a table of
    fluency, stray-markup share and repetition share per profile and prompt set)."""
    rows = [[p, k] + [summary[k][p][m] for m in FLUENCY] for k in sets for p in ctx.profiles]
    table = ("## Fluency\n\nFluency: the mean log-probability `" + ctx.baseline + "` gives each completion's tokens "
             "after the first; stray markup: share of completions with an HTML tag; repeats: share with a 3-word run "
             "three times.\n\n" + md_table(["profile", "prompts", "fluency (nats/token)", "stray markup", "repeats"],
                                          rows))
    forget = [k for k in ctx.topics.names if k in summary]
    if not forget or not ctx.others:
        return "", table

    def gap(p: str) -> float:  # fluency lost against baseline, plus a nat for each share of broken completions
        return sum((summary[k][ctx.baseline]["mean_fluency"] or 0) - (summary[k][p]["mean_fluency"] or 0)
                   + summary[k][p]["markup_rate"] + summary[k][p]["repeat_rate"] for k in forget) / len(forget)

    best = min(ctx.others, key=gap)
    s = {k: summary[k][best] for k in forget}
    sentence = (f"On the {'/'.join(forget)} prompts `{best}` reads most like `{ctx.baseline}`: " + ", ".join(
        f"{k} fluency {s[k]['mean_fluency']:.2f} vs {summary[k][ctx.baseline]['mean_fluency']:.2f} nats/token, "
        f"stray markup {s[k]['markup_rate']:.0%}, repeats {s[k]['repeat_rate']:.0%}" for k in forget) + ".")
    return sentence, table


async def robustness(ctx: EvalContext) -> dict:
    items = ctx.topics.robustness()
    if not items:
        raise EvalError(f"the robustness report needs a robustness set: topic {ctx.topics.title} has none")
    sets = sorted({it["set"] for it in items})
    by_set = {s: [it for it in items if it["set"] == s][: ctx.limit] for s in sets}
    recs = {s: await score_items(ctx, v, f"robustness/{s}") for s, v in by_set.items()}
    summary = {s: {p: tally(r[p]) for p in ctx.profiles} for s, r in recs.items()}
    leak = {p: sum(summary[s][p]["correct_rate"] for s in ADVERSARIAL if s in summary) /
            max(1, sum(s in summary for s in ADVERSARIAL)) for p in ctx.profiles}
    rows = [[s] + [f"{summary[s][p]['correct']}/{summary[s][p]['n']}" for p in ctx.profiles] for s in sets]
    rows.append(["leak (mean adversarial correct rate)"] + [leak[p] for p in ctx.profiles])
    sentence, fluency = fluency_table(ctx, summary, sets)
    opening = robustness_reading(ctx, leak) + " " + sentence
    md = ("# Robustness\n\n" + opening + "\n\nCorrect answers per set (paraphrases, "
          "other languages, jailbreak-style prefixes, "
          "in-context relearning) and on nearby domains (collateral forgetting).\n\n" +
          md_table(["set"] + ctx.profiles, rows) + "\n![robustness](robustness.png)\n\n" + fluency)
    grouped_bars(ctx.out / "robustness.png", "Correct rate by robustness set", sets,
                 {p: [summary[s][p]["correct_rate"] for s in sets] for p in ctx.profiles}, ylabel="correct rate")
    result = {"settings": ctx.settings(max_tokens=ctx.max_tokens(MAX_TOKENS), temperature=0), "summary": summary,
              "leak": leak, "records": recs}
    write_report(ctx, "robustness", result, md)
    return result
