"""`obliviate unlearn NAME --forget FILE… --retain FILE… [--dev-prompts FILE]`: from text about a topic
to a profile that forgets it.

1. The inputs are checked before the model loads: enough forget text, retain text that does not
   repeat it, dev prompts with a `forget` and a `generic` set.
2. The SAE's features are ranked by the ceiling method (discover.py): how often a feature fires on the
   forget text above the highest activation it reaches on any retain set (each file judged on its own,
   plus Wikipedia summaries), or on all but the n retain texts it peaks highest in (n in OUTLIERS); that
   activation becomes its `fires_above`. Each forget file is a topic, ranked on its own, so one profile
   can forget several topics (one intervention, every topic's features).
3. Candidates, the recipe of the shipped `hp_unlearn`: the top k features of each topic (k in KS, for
   each n), clamped negative for the rest of the sequence once one fires, SAE error kept. Each is served and
   scored on the dev prompts (greedy answers per set) and on cross-entropy over held-out text (the
   held-out documents after those the loss report reads).
4. The candidate with the fewest forget answers among those keeping generic >= 95% and nearby >= 80% of
   baseline's answers and adding <= 2% loss (on a tie, the one with fewer features, then the stricter
   threshold, then the more fluent forget completions) is written as NAME.yaml, with its numbers in the notes.
   Without dev prompts: the largest k within the loss bound.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from ablation.hooks import ProfileTable
from ablation.sae_io import load_sae
from ablation.spec import default_profiles_dir, load_profiles
from evals.cli import run_reports
from server.live import LiveServer
from server.settings import Settings
from workshop.discover import feature_acts, layer_of, profile_yaml, rank, retain_sets
from workshop.inputs import SETS, Inputs, UnlearnError
from workshop.recipe import DEV_DOCS, GENERIC_RETAIN, GOALS, KS, OUTLIERS
from workshop.scoring import score


def choose(rows: dict[str, dict], candidates: list[str]) -> tuple[str | None, dict[str, str]]:
    """-> (the chosen candidate or None, why each other one was passed over)."""
    base = rows["baseline"]
    why: dict[str, str] = {}
    ok = []
    for c in candidates:
        r = rows[c]
        fails = [f"loss +{r['loss_pct']:.2f}%"] if r["loss_pct"] > GOALS["loss_pct"] else []
        for s in ("generic", "nearby"):
            if s in base and base[s] and r[s] < GOALS[s] * base[s]:
                fails.append(f"{s} {r[s]}/{base[s]}")
        if fails:
            why[c] = ", ".join(fails)
        else:
            ok.append(c)
    if not ok:
        return None, why
    if "forget" in base:
        # ties go to fewer features, then to the stricter threshold: the dev prompts cannot tell them apart, and
        # each feature more (or outlier allowed) is one more chance to switch the clamp on in unseen generic text;
        # then to the more fluent forget completions (a weaker clamp, --scales, that forgets as much)
        best = min(ok, key=lambda c: (rows[c]["forget"], rows[c]["k"], rows[c].get("outliers", 0),
                                      -(rows[c].get("fluency") or 0.0)))
    else:
        best = max(ok, key=lambda c: rows[c]["k"])
    return best, why


def serving(lm, profiles_dir: Path):
    """A loopback server (real HTTP) of `lm` with the shipped profiles and those in `profiles_dir`."""

    dirs = [default_profiles_dir(), profiles_dir]
    return LiveServer(Settings(profiles=dirs), lm, ProfileTable(load_profiles(dirs, lm.name), lm.device, lm.dtype))


def report(lm, name: str, profiles_dir: Path, topics: str, out: Path, limit: int | None = None) -> Path:
    """Every eval report for `baseline` and NAME on the topics' test split, against a loopback server."""

    with serving(lm, profiles_dir) as srv:
        asyncio.run(run_reports(srv.url, [name], out, topic=topics, baseline="baseline", limit=limit))
    return out / "index.md"


def top_of_each(rankings: list[list[dict]], k: int) -> list[dict]:
    """The top k features of each topic's ranking, each feature once (where two topics share one, the
    first topic's row: its clamp value)."""
    out: dict[int, dict] = {}
    for ranking in rankings:
        for r in ranking[:k]:
            out.setdefault(r["feature"], r)
    return list(out.values())


def run(lm, name: str, inputs: Inputs, sae_ref: str, work: Path, n_docs: int = DEV_DOCS,
        n_wiki: int = GENERIC_RETAIN, scales: tuple[float, ...] = (1.0,), ks: tuple[int, ...] = KS,
        outliers: tuple[int, ...] = OUTLIERS) -> dict:
    """Ranks, writes and scores the candidates in `work`; -> {rows, chosen, why, yaml, …}."""

    sae = load_sae(sae_ref)
    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    retain = [feature_acts(lm, sae, t, layer) for t in retain_sets(inputs.retain, n_wiki)]
    forget = [feature_acts(lm, sae, texts, layer) for texts in inputs.forget]
    rankings = {n: [rank(f, retain, "ceiling", top=max(ks), outliers=n) for f in forget] for n in outliers}
    if not all(rankings[min(outliers)]):
        which = " (forget file " + ", ".join(str(i + 1) for i, r in enumerate(rankings[min(outliers)]) if not r) + ")"
        raise UnlearnError(f"no feature of {sae_ref} fires on the forget text{which if len(forget) > 1 else ''} "
                           f"above its highest activation on the retain text: give more (or more specific) forget "
                           f"text, retain text further from the topic, or another SAE (--sae) trained on text that "
                           f"contains the topic (`obliviate sae train --topic FILE`)")
    work.mkdir(parents=True, exist_ok=True)
    texts, params = {}, {}
    for n in outliers:
        for k in sorted({min(k, max(map(len, rankings[n]))) for k in ks}):
            chosen = top_of_each(rankings[n], k)
            for scale in scales:
                cand = f"{name}__k{k}" + (f"_o{n}" if len(outliers) > 1 else "") + \
                    (f"_s{scale:g}" if len(scales) > 1 else "")
                texts[cand] = profile_yaml(cand, lm.name, sae_ref, hook, chosen, True, "sequence", scale, cand)
                params[cand] = {"k": k, "outliers": n, "scale": scale}
                (work / f"{cand}.yaml").write_text(texts[cand])
    profiles = ["baseline", *texts]
    with serving(lm, work) as srv:
        rows = asyncio.run(score(srv.url, profiles, inputs.dev or {}, n_docs))
    for p, r in rows.items():
        r.update(params.get(p, {"k": 0, "outliers": 0, "scale": 0.0}))
        r["loss_pct"] = 100 * (r["ce"] - rows["baseline"]["ce"]) / rows["baseline"]["ce"]
    chosen, why = choose(rows, list(texts))
    return {"rows": rows, "chosen": chosen, "why": why, "yaml": texts, "sae": sae_ref, "hookpoint": hook,
            "ks": sorted({p["k"] for p in params.values()}), "outliers": list(outliers), "scales": list(scales)}


def final_yaml(name: str, result: dict, inputs: Inputs) -> str:
    """The chosen candidate under its own name, with how it was chosen in its notes."""

    spec = yaml.safe_load(result["yaml"][result["chosen"]])
    r, base = result["rows"][result["chosen"]], result["rows"]["baseline"]
    dev = ", ".join(f"{s} {r[s]}/{base[s]} of baseline's" for s in SETS if s in base) or "no dev prompts"
    if r.get("fluency") is not None and base.get("fluency") is not None:
        dev += f"; forget completions' fluency {r['fluency']:.2f} nats/token (baseline's {base['fluency']:.2f})"
    spec["name"] = name
    each = f" of each of the {len(inputs.forget)} forget topics" if len(inputs.forget) > 1 else ""
    left_out = f" once the {r['outliers']} retain texts where each peaks highest are left out" if r["outliers"] else ""
    spec["description"] = (f"{name}: the top {r['k']} features{each} of {result['sae']} that fire on the forget text "
                           f"above their highest activation on the retain text{left_out} "
                           f"({len(spec['interventions'][0]['edits'])} "
                           f"features), clamped negative for the rest of the sequence once one fires (SAE error "
                           f"kept). Made by `obliviate unlearn`.")
    chosen_from = f"k in {result['ks']}" + "".join(f" and {what} in {result[what]}" for what in ("outliers", "scales")
                                                   if len(result[what]) > 1)
    spec["metadata"]["notes"] = (
        f"Chosen from {chosen_from} (ceiling ranking; forget: "
        f"{' + '.join(str(len(t)) for t in inputs.forget)} texts; retain: "
        f"{sum(map(len, inputs.retain))} texts in {len(inputs.retain)} files + Wikipedia). Dev answers: {dev}; "
        f"loss added {r['loss_pct']:+.2f}% (CE on held-out Wikipedia summaries). Goals: generic >= 95%, nearby >= "
        f"80% of baseline, loss <= +2%. Features: " + spec["metadata"]["notes"])
    return yaml.safe_dump(spec, sort_keys=False, width=100)


def summary(result: dict) -> str:
    rows, base = result["rows"], result["rows"]["baseline"]
    sets = [s for s in SETS if s in base]
    chosen = rows.get(result["chosen"])
    warn = ""
    if chosen and base.get("forget") and chosen["forget"] > 0.5 * base["forget"]:
        warn = (f"\nwarning: the best candidate still answers {chosen['forget']}/{base['forget']} of baseline's forget "
                f"prompts: the SAE may have few features for this topic (its training text must contain the topic: "
                f"`obliviate sae train --topic FILE`), or try larger --scales")
    cols = sets + (["fluency"] if "forget" in base else [])
    cell = lambda v: "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| profile | k | " + " | ".join(sets) + (" | forget fluency" if "fluency" in cols else "") +
             " | CE | loss added | |", "|---" * (len(cols) + 5) + "|"]
    for p, r in rows.items():
        mark = "chosen" if p == result["chosen"] else result["why"].get(p, "")
        lines.append(f"| {p} | {r['k']} | " + " | ".join(cell(r[c]) for c in cols) +
                     f" | {r['ce']:.4f} | {r['loss_pct']:+.2f}% | {mark} |")
    return "\n".join(lines) + warn
