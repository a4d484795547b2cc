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
import json
from dataclasses import dataclass
from pathlib import Path

KS = (2, 3, 5, 8, 12, 16)
# retain texts each feature may peak above its threshold in (discover.rank's `outliers`): 0 = its highest activation
OUTLIERS = (0,)
# Wikipedia summaries on the retain side. A feature's `fires_above` is its highest activation there, so each
# feature fires on about 1 in N unseen generic texts and switches the clamp on. Measured on the loss report's
# documents: with 300, hp_sw_unlearn at k = 12 added 2.7 % loss (k = 8: 0.5 %); with 1500 the one chosen
# added 0.3 %. 1500 cost about 80 s more.
GENERIC_RETAIN = 1500
# held-out documents the loss is read from when choosing (never the loss report's: evals.scoring.heldout_docs)
DEV_DOCS = 40
MIN_TEXTS, MIN_CHARS = 8, 2000
SETS = ("forget", "generic", "nearby")
GOALS = {"generic": 0.95, "nearby": 0.80, "loss_pct": 2.0}


class UnlearnError(ValueError):
    """Inputs or results that cannot make a profile; the message says what to try."""


@dataclass
class Inputs:
    forget: list[list[str]]  # one list per forget file: a topic each
    retain: list[list[str]]  # one list per retain file
    dev: dict[str, list[dict]] | None  # set -> [{prompt, answers}]


def read_files(paths: list[Path], what: str) -> list[list[str]]:
    from ablation.offline.discover import read_texts

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UnlearnError(f"{p}: {what} file not found")
        try:
            out.append(read_texts(p))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
            raise UnlearnError(f"{p}: cannot read {what} texts ({type(e).__name__}: {e})") from None
        if not out[-1]:
            raise UnlearnError(f"{p}: no {what} text in it (one text a line; lines starting with # are comments)")
    return out


def read_dev(path: Path) -> dict[str, list[dict]]:
    if not Path(path).is_file():
        raise UnlearnError(f"{path}: dev prompts file not found")
    sets: dict[str, list[dict]] = {s: [] for s in SETS}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = {"id": row.get("id", f"{path.stem}{i}"), "prompt": row["prompt"], "answers": list(row["answers"])}
            sets[row["set"]].append(item)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UnlearnError(f"{path}:{i}: each line must be JSON with prompt, answers (a list) and set "
                               f"({', '.join(SETS)}); {type(e).__name__}: {e}") from None
    if not sets["forget"] or not sets["generic"]:
        raise UnlearnError(f"{path}: need dev prompts in the sets 'forget' and 'generic' (found "
                           f"{', '.join(f'{k} {len(v)}' for k, v in sets.items())})")
    return {k: v for k, v in sets.items() if v}


def read_inputs(forget: list[Path], retain: list[Path], dev: Path | None) -> Inputs:
    topics = read_files(forget, "forget")
    for p, texts in zip(forget, topics):
        chars = sum(map(len, texts))
        if len(texts) < MIN_TEXTS or chars < MIN_CHARS:
            raise UnlearnError(f"{p}: too little forget text ({len(texts)} texts, {chars} characters): give at least "
                               f"{MIN_TEXTS} texts and {MIN_CHARS} characters about the topic, one text a line")
    forget_texts = [t for texts in topics for t in texts]
    retain_sets = read_files(retain, "retain")
    for p, texts in zip(retain, retain_sets):
        if len(texts) < 2:
            raise UnlearnError(f"{p}: {len(texts)} retain texts; give text on what must be kept, one text a line")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    shared = {norm(t) for t in forget_texts} & {norm(t) for texts in retain_sets for t in texts}
    if len(shared) > 0.1 * len(forget_texts):
        raise UnlearnError(f"{len(shared)} of the {len(forget_texts)} forget texts are also in the retain files: "
                           f"the retain text must be about other things")
    return Inputs(topics, retain_sets, read_dev(dev) if dev else None)


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
    from ablation.hooks import ProfileTable
    from ablation.spec import default_profiles_dir, load_profiles
    from server.live import LiveServer
    from server.settings import Settings

    dirs = [default_profiles_dir(), profiles_dir]
    return LiveServer(Settings(profiles=dirs), lm, ProfileTable(load_profiles(dirs, lm.name), lm.device, lm.dtype))


def report(lm, name: str, profiles_dir: Path, topics: str, out: Path, limit: int | None = None) -> Path:
    """Every eval report for `baseline` and NAME on the topics' test split, against a loopback server."""
    import argparse

    from evals.cli import run_reports

    with serving(lm, profiles_dir) as srv:
        args = argparse.Namespace(server=srv.url, model=None, api_key=None, profile_via="field", concurrency=8,
                                  out=out, limit=limit, split="test", topic=topics, report="all")
        asyncio.run(run_reports(args, ["baseline", name]))
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
    from ablation.offline.discover import feature_acts, layer_of, profile_yaml, rank, retain_sets
    from ablation.offline.sweep import score
    from ablation.sae_io import load_sae

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
    import yaml

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
