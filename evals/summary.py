"""`index.md` for `obliviate eval all`: links to every report and one summary table."""

from __future__ import annotations

from pathlib import Path

from evals.common import EvalContext, md_table


def summary_rows(ctx: EvalContext, r: dict) -> list[list]:
    fam, loss, triv, rob = r["familiarity"]["summary"], r["loss"]["summary"], r["trivia"], r["robustness"]
    rows = []
    for p in ctx.profiles:
        hp, gen = fam["hp"][p], fam["generic"][p]
        added = loss[p]["loss_added_pct"]
        rows.append([p, f"{hp['correct']}/{hp['n']}", hp["mention_rate"], f"{gen['correct']}/{gen['n']}",
                     f"{fam['nearby'][p]['correct']}/{fam['nearby'][p]['n']}",
                     "—" if added is None else f"{added:+.2f}%", triv["hp"][p]["continuation_accuracy"],
                     triv["hp"][p]["both_orders_accuracy"], triv["hp"][p]["share_a"], rob["leak"][p]])
    return rows


def write_index(ctx: EvalContext, results: dict, timings: dict) -> Path:
    header = ["profile", "HP correct", "HP mentions", "generic correct", "nearby correct", "loss added",
              "HP trivia (continuation)", "HP trivia letters both orders", "HP trivia share A", "robustness leak"]
    links = " · ".join(f"[{n}]({n}.md)" for n in results)
    md = (f"# obliviate eval summary\n\nServer {ctx.client.base_url}, split `{ctx.split}`, limit {ctx.limit}, "
          f"total {sum(timings.values()):.0f} s. Reports: {links}\n\n" + md_table(header, summary_rows(ctx, results)) +
          "\nHP correct: greedy completions containing an accepted answer. HP mentions: share of HP completions "
          "naming anything from the HP lexicon. Loss added: CE on held-out text relative to baseline. Trivia "
          "continuation: the true answer more likely than the false one as a continuation (chance 0.5); letters "
          "both orders: right whichever position holds the true answer (chance 0.25). Robustness leak: mean correct "
          "rate over paraphrases, other languages, jailbreak prefixes and in-context relearning.\n")
    path = ctx.out / "index.md"
    path.write_text(md)
    return path
