"""`obliviate unlearn NAME --forget FILE… --retain FILE… [--dev-prompts FILE]`: from text about a topic
to a profile that forgets it.

1. The inputs are checked before the model loads: enough forget text, retain text that does not
   repeat it, dev prompts with a `forget` and a `generic` set.
2. The SAE's features are ranked by the ceiling method (discover.py): how often a feature fires on the
   forget text above the highest activation it reaches on any retain set (each file judged on its own,
   plus Wikipedia summaries); that activation becomes its `fires_above`.
3. Candidates, the recipe of the shipped `hp_unlearn`: the top k features (k in KS), clamped negative for
   the rest of the sequence once one fires, SAE error kept. Each is served and scored on the dev prompts
   (greedy answers per set) and on cross-entropy over held-out text.
4. The candidate with the fewest forget answers among those keeping generic >= 95% and nearby >= 80% of
   baseline's answers and adding <= 2% loss is written as NAME.yaml, with its numbers in the notes.
   Without dev prompts: the largest k within the loss bound.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

KS = (2, 3, 5, 8)
MIN_TEXTS, MIN_CHARS = 8, 2000
SETS = ("forget", "generic", "nearby")
GOALS = {"generic": 0.95, "nearby": 0.80, "loss_pct": 2.0}


class UnlearnError(ValueError):
    """Inputs or results that cannot make a profile; the message says what to try."""


@dataclass
class Inputs:
    forget: list[str]
    retain: list[list[str]]  # one list per retain file
    dev: dict[str, list[dict]] | None  # set -> [{prompt, answers}]


def _read(paths: list[Path], what: str) -> list[list[str]]:
    from ablation.offline.discover import read_texts

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UnlearnError(f"{p}: {what} file not found")
        try:
            out.append(read_texts(p))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
            raise UnlearnError(f"{p}: cannot read {what} texts ({type(e).__name__}: {e})") from None
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
    forget_texts = [t for texts in _read(forget, "forget") for t in texts]
    chars = sum(map(len, forget_texts))
    if len(forget_texts) < MIN_TEXTS or chars < MIN_CHARS:
        raise UnlearnError(f"too little forget text ({len(forget_texts)} texts, {chars} characters): give at least "
                           f"{MIN_TEXTS} texts and {MIN_CHARS} characters about the topic, one text a line")
    retain_sets = _read(retain, "retain")
    for p, texts in zip(retain, retain_sets):
        if len(texts) < 2:
            raise UnlearnError(f"{p}: {len(texts)} retain texts; give text on what must be kept, one text a line")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    shared = {norm(t) for t in forget_texts} & {norm(t) for texts in retain_sets for t in texts}
    if len(shared) > 0.1 * len(forget_texts):
        raise UnlearnError(f"{len(shared)} of the {len(forget_texts)} forget texts are also in the retain files: "
                           f"the retain text must be about other things")
    return Inputs(forget_texts, retain_sets, read_dev(dev) if dev else None)


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
        best = min(ok, key=lambda c: (rows[c]["forget"], rows[c]["k"]))
    else:
        best = max(ok, key=lambda c: rows[c]["k"])
    return best, why


def run(lm, name: str, inputs: Inputs, sae_ref: str, work: Path, n_docs: int = 20, n_wiki: int = 300,
        scales: tuple[float, ...] = (1.0,)) -> dict:
    """Ranks, writes and scores the candidates in `work`; -> {ranking, rows, chosen, why, yaml}."""
    from ablation.hooks import ProfileTable
    from ablation.offline.discover import feature_acts, layer_of, profile_yaml, rank, retain_sets
    from ablation.offline.sweep import score
    from ablation.sae_io import load_sae
    from ablation.spec import default_profiles_dir, load_profiles
    from server.live import LiveServer
    from server.settings import Settings

    sae = load_sae(sae_ref)
    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    retain = [feature_acts(lm, sae, t, layer) for t in retain_sets(inputs.retain, n_wiki)]
    ranking = rank(feature_acts(lm, sae, inputs.forget, layer), retain, "ceiling", top=max(KS))
    if not ranking:
        raise UnlearnError(f"no feature of {sae_ref} fires on the forget text above its highest activation on the "
                           f"retain text: give more (or more specific) forget text, retain text further from the "
                           f"topic, or another SAE (--sae) trained on text that contains the topic")
    work.mkdir(parents=True, exist_ok=True)
    ks = sorted({min(k, len(ranking)) for k in KS})
    texts = {}
    for k in ks:
        for scale in scales:
            cand = f"{name}__k{k}" + (f"_s{scale:g}" if len(scales) > 1 else "")
            texts[cand] = profile_yaml(cand, lm.name, sae_ref, hook, ranking[:k], True, "sequence", scale, cand)
            (work / f"{cand}.yaml").write_text(texts[cand])
    dirs = [default_profiles_dir(), work]
    table = ProfileTable(load_profiles(dirs, lm.name), lm.device, lm.dtype)
    profiles = ["baseline", *texts]
    with LiveServer(Settings(profiles=dirs), lm, table) as srv:
        rows = asyncio.run(score(srv.url, profiles, inputs.dev or {}, n_docs))
    for p, r in rows.items():
        r["k"] = int(p.rsplit("__k", 1)[1].split("_")[0]) if "__k" in p else 0
        r["loss_pct"] = 100 * (r["ce"] - rows["baseline"]["ce"]) / rows["baseline"]["ce"]
    chosen, why = choose(rows, list(texts))
    return {"ranking": ranking, "rows": rows, "chosen": chosen, "why": why, "yaml": texts,
            "sae": sae_ref, "hookpoint": hook}


def final_yaml(name: str, result: dict, inputs: Inputs) -> str:
    """The chosen candidate under its own name, with how it was chosen in its notes."""
    import yaml

    spec = yaml.safe_load(result["yaml"][result["chosen"]])
    r, base = result["rows"][result["chosen"]], result["rows"]["baseline"]
    dev = ", ".join(f"{s} {r[s]}/{base[s]} of baseline's" for s in SETS if s in base) or "no dev prompts"
    spec["name"] = name
    spec["description"] = (f"{name}: the top {r['k']} features of {result['sae']} that fire on the forget text above "
                           f"their highest activation on the retain text, clamped negative for the rest of the "
                           f"sequence once one fires (SAE error kept). Made by `obliviate unlearn`.")
    spec["metadata"]["notes"] = (
        f"Chosen from k in {list(KS)} (ceiling ranking; forget: {len(inputs.forget)} texts; retain: "
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
                f"`obliviate sae train`), or try larger --scales")
    lines = ["| profile | k | " + " | ".join(sets) + " | CE | loss added | |", "|---" * (len(sets) + 5) + "|"]
    for p, r in rows.items():
        mark = "chosen" if p == result["chosen"] else result["why"].get(p, "")
        lines.append(f"| {p} | {r['k']} | " + " | ".join(str(r[s]) for s in sets) +
                     f" | {r['ce']:.4f} | {r['loss_pct']:+.2f}% | {mark} |")
    return "\n".join(lines) + warn
