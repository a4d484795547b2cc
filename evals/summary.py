"""`index.md` for `obliviate eval all`: links to every report and one summary table."""

from __future__ import annotations

from pathlib import Path

from evals.common import EvalContext, md_table


def summary_table(ctx: EvalContext, r: dict) -> tuple[list[str], list[list]]:
    """Per profile: each forgotten topic's answers and mentions, generic and nearby answers, loss added,
    and, where the reports ran, trivia and the robustness leak."""
    fam, loss = r["familiarity"]["summary"], r["loss"]["summary"]
    topics = ctx.topics.names
    triv = [k for k in topics if k in r.get("trivia", {})]
    header = (["profile"] + [f"{k} {m}" for k in topics for m in ("correct", "mentions")] +
              ["generic correct", "nearby correct", "loss added"] +
              [f"{k} {m}" for k in topics for m in ("fluency", "markup", "repeats")] +
              [f"{k} trivia {m}" for k in triv for m in ("(continuation)", "letters both orders", "share A")] +
              (["robustness leak"] if "robustness" in r else []) +
              [f"{k} answers kept under attack" for k in topics if "attacks" in r])
    count = lambda s: f"{s['correct']}/{s['n']}"  # noqa: E731
    rows = []
    for p in ctx.profiles:
        added = loss[p]["loss_added_pct"]
        rows.append([p] + [v for k in topics for v in (count(fam[k][p]), fam[k][p]["mention_rate"])] +
                    [count(fam["generic"][p]), count(fam["nearby"][p]), "—" if added is None else f"{added:+.2f}%"] +
                    [fam[k][p][m] for k in topics for m in ("mean_fluency", "markup_rate", "repeat_rate")] +
                    [r["trivia"][k][p][m] for k in triv
                     for m in ("continuation_accuracy", "both_orders_accuracy", "share_a")] +
                    ([r["robustness"]["leak"][p]] if "robustness" in r else []) +
                    [r["attacks"]["pooled"][k][p] for k in topics if "attacks" in r])
    return header, rows


def write_index(ctx: EvalContext, results: dict, timings: dict) -> Path:
    header, rows = summary_table(ctx, results)
    links = " · ".join(f"[{n}]({n}.md)" for n in results)
    md = (f"# obliviate eval summary\n\nServer {ctx.client.base_url}, topic {ctx.topics.title} "
          f"(`{','.join(ctx.topics.names)}`), split `{ctx.split}`, limit {ctx.limit}, "
          f"total {sum(timings.values()):.0f} s. Reports: {links}\n\n" + md_table(header, rows) +
          "\nCorrect: greedy completions containing an accepted answer. Mentions: share of the topic's completions "
          "naming anything from the topics' lexicons. Nearby: prompts on neighbouring topics that must be kept. Loss "
          "added: CE on held-out text relative to baseline. Fluency, markup, repeats: of the topic's completions, "
          "baseline's mean log-probability of their tokens, the share with a stray HTML tag, the share with a "
          "3-word run three times. Trivia continuation: the true answer more likely than "
          "the false one as a continuation (chance 0.5); letters both orders: right whichever position holds the "
          "true answer (chance 0.25). Robustness leak: mean correct rate over paraphrases, other languages, "
          "jailbreak prefixes and in-context relearning. Answers kept under attack: the share of baseline's answers a "
          "profile gives on the attack report's prompts, every family pooled.\n")
    path = ctx.out / "index.md"
    path.write_text(md)
    return path
