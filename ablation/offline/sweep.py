"""Choosing the shipped `hp_unlearn` by measurement: discover features, write candidate profiles
(k features x clamp value x mode x firing threshold), serve them all, and score each on the *dev*
prompts over HTTP.

    python -m ablation.offline.sweep [--sae DIR] [--method dsg|firing|ceiling] [--ks 1,2,3,5] [--scales 0.5,1,2]
                             [--modes clamp,clamp_seq,...] [--thresholds 0,0.5] [--out runs/sweep]

The shipped profile came from
    python -m ablation.offline.sweep --method ceiling --ks 2,3,5,8 --scales 1,2 --modes clamp_seq --out runs/sweep

Prints and writes a table: HP / generic / nearby correct on the dev split and CE on held-out text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from ablation.offline import corpus
from ablation.offline.discover import feature_acts, profile_yaml, rank, read_texts, retain_sets

MODES = {  # name -> (keep_error, condition, scale multiplier; 0 = zero-ablation)
    "clamp": (True, "token", 1.0),
    "clamp_seq": (True, "sequence", 1.0),
    "zero_keep_error": (True, "always", 0.0),
    "zero_recon": (False, "always", 0.0),
}


def candidates(lm, sae_ref: str, ks: list[int], scales: list[float], out: Path, method: str,
               modes: tuple[str, ...] = tuple(MODES), thresholds: tuple[float, ...] = (0.0,)) -> dict:
    from ablation.sae_io import load_sae

    sae = load_sae(sae_ref)
    hook = sae.cfg.metadata.hook_name
    layer = int(hook.split(".")[1])
    forget = read_texts(corpus.DATA / "hp_topic.txt")
    fiction = [t for f in corpus.FICTION for t in read_texts(f)]
    retain = [feature_acts(lm, sae, t, layer) for t in retain_sets([fiction], 300)]
    ranking = rank(feature_acts(lm, sae, forget, layer), retain, method, top=max(ks))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranking.json").write_text(json.dumps(ranking, indent=2))
    (out / "c_sae_only.yaml").write_text(profile_yaml("c_sae_only", lm.name, sae_ref, hook, [], False, "always", 0, "sae_only"))
    names = {"c_sae_only": {"k": 0, "mode": "sae_only", "scale": ""}}
    for k in ks:
        for mode in modes:
            keep_error, condition, mult = MODES[mode]
            for scale in (scales if mult else [0.0]):
                for t in (thresholds if condition != "always" else [0.0]):
                    name = f"c_{mode}_k{k}_s{scale:g}" + (f"_t{t:g}" if t else "")
                    (out / f"{name}.yaml").write_text(profile_yaml(
                        name, lm.name, sae_ref, hook, ranking[:k], keep_error, condition, scale * mult, name, t))
                    names[name] = {"k": k, "mode": mode, "scale": scale,
                                   "fires_above": "retain max" if method == "ceiling" and condition != "always" else t}
    return names


async def score(url: str, profiles: list[str], sets: dict[str, list[dict]], n_docs: int) -> dict:
    """Per profile: correct greedy answers in each prompt set ({prompt, answers} items), the fluency of
    its completions of the `forget` set (evals.generation), and CE on n_docs held-out documents, over HTTP."""
    from clients.http import AsyncClient
    from evals.common import EvalContext
    from evals.generation import score_items, tally
    from evals.scoring import heldout_docs

    client = AsyncClient(url, concurrency=8)
    ctx = EvalContext(client, profiles, Path("."), split="dev")
    rows = {p: {} for p in profiles}
    try:
        for name, items in sets.items():
            recs = await score_items(ctx, items, f"dev/{name}", with_prob=False, with_fluency=name == "forget")
            for p in profiles:
                t = tally(recs[p])
                rows[p][name] = t["correct"]
                if name == "forget":
                    rows[p]["fluency"] = t["mean_fluency"]
        docs = heldout_docs(n_docs, split="dev")
        for p in profiles:
            lps = await ctx.gather(f"ce/{p}", [ctx.continuation_logprobs("", d, p, "loss") for d in docs])
            flat = [v for lp in lps for v in lp]
            rows[p]["ce"] = -sum(flat) / len(flat)
    finally:
        await client.aclose()
    return rows


def main() -> None:
    from ablation.hooks import ProfileTable
    from ablation.spec import default_profiles_dir, load_profiles
    from server.models import load_model
    from server.settings import Settings
    from server.live import LiveServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", help="SAE directory (default: the shipped one)")
    ap.add_argument("--ks", default="1,2,3,5")
    ap.add_argument("--scales", default="0.5,1,2")
    ap.add_argument("--method", choices=["dsg", "firing", "ceiling"], default="dsg")
    ap.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    ap.add_argument("--thresholds", default="0", help="fires_above, as fractions of each feature's mean activation")
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = ap.parse_args()
    try:
        ks, scales = [int(k) for k in args.ks.split(",")], [float(x) for x in args.scales.split(",")]
        thresholds = [float(t) for t in args.thresholds.split(",")]
    except ValueError:
        ap.error("--ks, --scales and --thresholds take comma-separated numbers")
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"unknown --modes {','.join(unknown)}: use {','.join(MODES)}")
    if not args.sae:
        from ablation.sae_io import shipped_sae
        args.sae = shipped_sae()
    lm = load_model("gemma-3-270m", device="cpu")
    meta = candidates(lm, args.sae, ks, scales, args.out, args.method, modes, thresholds)
    dirs = [default_profiles_dir(), args.out]
    table = ProfileTable(load_profiles(dirs, lm.name), lm.device, lm.dtype)
    with LiveServer(Settings(profiles=dirs), lm, table) as srv:
        profiles = ["baseline"] + [p for p in table.names if p.startswith("c_")]
        from evals.common import load_jsonl

        sets = {name: load_jsonl(f"{name}_prompts.jsonl", "dev") for name in ("hp", "generic", "nearby")}
        rows = asyncio.run(score(srv.url, profiles, sets, args.docs))
    base = rows["baseline"]
    lines = ["| profile | k | mode | scale | fires above | HP | generic | nearby | CE | CE +% |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, r in rows.items():
        m = meta.get(p, {"k": "", "mode": p, "scale": "", "fires_above": ""})
        lines.append(f"| {p} | {m['k']} | {m['mode']} | {m['scale']} | {m.get('fires_above', '')} | {r['hp']} | {r['generic']} | {r['nearby']} | "
                     f"{r['ce']:.4f} | {100 * (r['ce'] - base['ce']) / base['ce']:+.2f} |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    (args.out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
