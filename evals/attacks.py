"""The attack report: the forgotten answers asked for as a user who wants them back would ask.

Families (evals/data/attacks; dev and test splits): `prefix` (jailbreak, role-play and instruction
wrappers around the topic's own prompts), `language` (French, Spanish, German, Italian), `spelling`
(misspellings, inserted characters, aliases, and "informed" perturbations of the tokens that trip the
features), `relearning` (some facts given in the prompt, a disjoint one asked), `long_context` (the topic
named once, a long unrelated passage, then a question that does not name it), `gcg` (adversarial tokens
found offline by a GCG search against the model and a profile, `obliviate attack gcg`, replayed over
HTTP) and `likelihood` (two-choice trivia scored by prompt logprobs: a side channel that needs no text).
Every family also wraps generic questions the same way (the controls): a wrapper that breaks every
answer is not forgetting. Each completion's trigger audit (the server's `unlearning` field) says whether
the profile's edit fired in the prompt; an attack that gets an answer back is usually one that did not
trip it. With `--chat` every attacked prompt is a user's chat message (a chat topic names its own attacks
and controls, e.g. evals/data/topics/hp_chat.yaml) and the gcg family is left out: its tokens were searched
against completion prompts.
"""

from __future__ import annotations

import json

from evals.charts import grouped_bars
from evals.common import DATA, EvalContext, EvalError, is_correct, load_jsonl, md_table, write_report
from evals.scoring import answer_score, score_continuations

ATTACKS = DATA / "attacks"
GCG_FILE = ATTACKS / "gcg.json"
FAMILIES = ("prefix", "language", "spelling", "relearning", "long_context", "gcg", "likelihood")
PER_WRAPPER = 8  # topic prompts under each prefix wrapper and under the gcg tokens
PER_WRAPPER_CONTROL = 4
MAX_TOKENS = 10
CONTROL = "control"


def filler() -> str:
    return (ATTACKS / "filler.txt").read_text().strip()


def gcg_tokens(topic: str) -> str | None:
    """The adversarial text found for a topic (`obliviate attack gcg`), if any."""
    found = json.loads(GCG_FILE.read_text()) if GCG_FILE.is_file() else {}
    return (found.get(topic) or {}).get("text")


def _item(it: dict, topic: str, **extra) -> dict:
    return {"id": it["id"], "topic": topic, "family": it.get("family"), "prompt": it["prompt"],
            "answers": it["answers"], **extra}


def attack_items(ctx: EvalContext) -> list[dict]:
    """Every generated attack of this run's split: the topics' items and the controls (topic `control`)."""
    split, items = ctx.split, []
    wrappers = load_jsonl(ATTACKS / "wrappers.jsonl", split)
    generic = ctx.topics.generic(split, None)
    controls = load_jsonl(ctx.topics.topics[0].attack_controls, split)  # topics measured together share one set
    for topic in ctx.topics.topics:
        if topic.attacks is None:
            continue
        own = load_jsonl(topic.attacks, split)
        plain = load_jsonl(topic.prompts, split)[:PER_WRAPPER]
        items += [_item(it, topic.name) for it in own]
        for w in wrappers:
            items += [_item(it, topic.name, id=f"{w['id']}-{it['id']}", family="prefix",
                            prompt=w["wrapper"].format(prompt=it["prompt"])) for it in plain]
        adv = None if ctx.chat else gcg_tokens(topic.name)  # searched against completion prompts (no chat template)
        if adv:
            items += [_item(it, topic.name, id=f"gcg-{it['id']}", family="gcg", prompt=f"{adv}\n{it['prompt']}")
                      for it in plain]
    if not items:
        raise EvalError(f"the attacks report needs attack prompts: topic {ctx.topics.title} has none "
                        f"(an `attacks:` file in its topic YAML)")
    families = {it["family"] for it in items}
    items += [_item(it, CONTROL) for it in controls if it["family"] in families]
    for w in wrappers:
        items += [_item(it, CONTROL, id=f"{w['id']}-{it['id']}", family="prefix",
                        prompt=w["wrapper"].format(prompt=it["prompt"])) for it in generic[:PER_WRAPPER_CONTROL]]
    adv = [] if ctx.chat else [a for t in ctx.topics.names if (a := gcg_tokens(t))]
    for i, a in enumerate(adv):
        items += [_item(it, CONTROL, id=f"gcg{i}-{it['id']}", family="gcg", prompt=f"{a}\n{it['prompt']}")
                  for it in generic[:PER_WRAPPER_CONTROL]]
    for it in items:
        it["prompt"] = it["prompt"].replace("{filler}", filler())
    if ctx.limit:  # at most `limit` per family and topic
        seen: dict[tuple, int] = {}
        for it in items:
            seen[it["family"], it["topic"]] = seen.get((it["family"], it["topic"]), 0) + 1
            it["rank"] = seen[it["family"], it["topic"]]
        items = [it for it in items if it.pop("rank") <= ctx.limit]
    return items


def tally_family(items: list[dict], got: dict[str, list[dict]], baseline: str) -> dict:
    """Per profile over `items`: answers, answers on the prompts baseline answered (kept) and the trigger rate."""
    answered = [i for i in range(len(items)) if got[baseline][i]["correct"]]
    out = {}
    for p, recs in got.items():
        audited = [r["triggered"] for r in recs if r["triggered"] is not None]
        kept = sum(recs[i]["correct"] for i in answered)
        out[p] = {"n": len(items), "correct": sum(r["correct"] for r in recs), "baseline_correct": len(answered),
                  "kept": kept, "kept_rate": kept / len(answered) if answered else None,
                  "trigger_rate": sum(audited) / len(audited) if audited else None}
    return out


async def likelihood(ctx: EvalContext) -> dict:
    """Two-choice trivia scored by the answers' log-likelihoods: per topic (and generic, the control), per
    profile, the questions answered right and the share of baseline's right ones still right (chance 0.5)."""
    sets = {**ctx.topics.trivia(ctx.limit), CONTROL: load_jsonl("generic_trivia.jsonl", "all", ctx.limit)}
    out = {}
    for name, items in sets.items():
        scores = await ctx.gather(f"attacks/likelihood {name}", [
            answer_score(ctx, it["question"], it[k], p) for p in ctx.profiles for it in items for k in ("true", "false")])
        n = 2 * len(items)
        got = {p: [{"correct": r["right"], "triggered": None}  # trivia's rule: the true answer scores higher
                   for r in score_continuations(items, scores[j * n:(j + 1) * n])["continuation_records"]]
               for j, p in enumerate(ctx.profiles)}
        out[name] = tally_family(items, got, ctx.baseline)
    return out


def pooled(summary: dict, topic: str, profile: str, families: list[str]) -> float | None:
    """Answers kept over every family of a topic (the likelihood side channel apart: its chance is 0.5)."""
    cells = [summary[f][topic][profile] for f in families if f != "likelihood" and topic in summary[f]]
    base = sum(c["baseline_correct"] for c in cells)
    return sum(c["kept"] for c in cells) / base if base else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0%}"


def opening(ctx: EvalContext, summary: dict, families: list[str]) -> str:
    parts = []
    for t in ctx.topics.names:
        kept = ", ".join(f"`{p}` {_pct(pooled(summary, t, p, families))}" for p in ctx.others)
        leaks = {p: [f for f in families if f != "likelihood" and t in summary[f]
                     and (summary[f][t][p]["kept_rate"] or 0) > 0.25] for p in ctx.others}
        worst = "; ".join(f"`{p}` gives more than a quarter back under {', '.join(fs)}" for p, fs in leaks.items() if fs)
        parts.append(f"On attacked {t} prompts, the share of `{ctx.baseline}`'s answers each profile still gives: "
                     f"{kept}." + (f" {worst}." if worst else " No family gets more than a quarter back."))
    return " ".join(parts)


async def attacks(ctx: EvalContext) -> dict:
    items = attack_items(ctx)
    jobs = [(p, it) for p in ctx.profiles for it in items]
    done = await ctx.gather("attacks", [ctx.greedy_audited(it["prompt"], p, ctx.max_tokens(MAX_TOKENS))
                                            for p, it in jobs])
    records = {p: [] for p in ctx.profiles}
    for (p, it), (text, triggered) in zip(jobs, done):
        records[p].append({**it, "completion": text, "correct": is_correct(text, it["answers"]), "triggered": triggered})
    families = [f for f in FAMILIES if any(it["family"] == f for it in items)]
    groups = [*ctx.topics.names, CONTROL]
    summary: dict[str, dict] = {}
    for f in families:
        for g in groups:
            idx = [i for i, it in enumerate(items) if it["family"] == f and it["topic"] == g]
            if idx:
                summary.setdefault(f, {})[g] = tally_family(
                    [items[i] for i in idx], {p: [records[p][i] for i in idx] for p in ctx.profiles}, ctx.baseline)
    if ctx.topics.trivia(1):
        summary["likelihood"] = await likelihood(ctx)
        families.append("likelihood")

    def cell(c: dict) -> str:
        trig = "" if c["trigger_rate"] is None else f", fired {c['trigger_rate']:.0%}"
        return f"{_pct(c['kept_rate'])} ({c['kept']}/{c['baseline_correct']}{trig})"

    md = ["# Attacks\n\n", opening(ctx, summary, families), "\n\nEach cell: the share of `", ctx.baseline,
          "`'s answers the profile gives on the same attacked prompts (answers kept / baseline's answers) and, for "
          "profiles that edit the model, the share of prompts on which the edit fired within the prompt (the "
          "trigger audit; a firing at a generated token comes too late to withhold the answer). Greedy, "
          f"{ctx.max_tokens(MAX_TOKENS)} tokens{', each prompt asked as a chat message' if ctx.chat else ''}. "
          "`likelihood`: two-choice trivia scored by the answers' log-likelihood, the share of "
          "baseline's right choices still right (chance 50%). Controls: generic questions under the same wrappers "
          "(they should be kept, and should not fire).\n"]
    for g in groups:
        rows = [[f] + [cell(summary[f][g][p]) for p in ctx.profiles] for f in families if g in summary[f]]
        if g != CONTROL:
            rows.append(["all (pooled, likelihood apart)"] + [_pct(pooled(summary, g, p, families)) for p in ctx.profiles])
        md.append(f"\n## {'controls (generic questions)' if g == CONTROL else g + ' prompts'}\n\n")
        md.append(md_table(["family"] + ctx.profiles, rows))
    md.append("\n![attacks](attacks.png)\n")
    for t in ctx.topics.names:  # what came back: the answers an unlearning profile gave under attack
        back = [(p, r) for p in ctx.others for r in records[p] if r["topic"] == t and r["correct"]
                and r["triggered"] is not None]
        if back:
            md.append(f"\n## {t}: answers that came back under an unlearning profile\n\n")
            md.append(md_table(["profile", "family", "prompt", "completion", "fired"],
                               [[p, r["family"], r["prompt"][-120:], r["completion"].strip(), r["triggered"]]
                                for p, r in back]))
    first = ctx.topics.names[0]
    grouped_bars(ctx.out / "attacks.png", f"{first} answers kept under attack (share of {ctx.baseline}'s)",
                 [f for f in families if first in summary[f]],
                 {p: [summary[f][first][p]["kept_rate"] for f in families if first in summary[f]] for p in ctx.others},
                 ylabel="answers kept")
    result = {"settings": ctx.settings(max_tokens=ctx.max_tokens(MAX_TOKENS), temperature=0), "families": families,
              "summary": summary, "pooled": {t: {p: pooled(summary, t, p, families) for p in ctx.profiles}
                                             for t in ctx.topics.names},
              "records": records}
    write_report(ctx, "attacks", result, "".join(md))
    return result
