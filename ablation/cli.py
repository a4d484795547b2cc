"""`obliviate sae …` and `obliviate features …`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_sae(sub) -> None:
    p = sub.add_parser("sae", help="train the served model's own SAE")
    ssub = p.add_subparsers(dest="sae_command", required=True, parser_class=type(p))
    t = ssub.add_parser("train", help="train a TopK SAE with sae_lens (resumable; deterministic with --seed)")
    t.add_argument("--model", default="gemma-3-270m")
    t.add_argument("--layers", type=_ints, default=[6, 9], help="layers to compare; the best ships (default 6,9)")
    t.add_argument("--width", type=int, default=4096)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--generic-tokens", type=int, default=800_000)
    t.add_argument("--hp-repeat", type=int, default=4)
    t.add_argument("--samples-per-prompt", type=int, default=4)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--eval-docs", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path(__file__).parent / "saes")
    t.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "obliviate" / "sae-train")
    t.set_defaults(func=cmd_sae_train)


def cmd_sae_train(args) -> int:
    import json

    from ablation.corpus import CorpusError
    from ablation.train import TrainConfig, run
    from server.cli import CLIError

    cfg = TrainConfig(layers=args.layers, width=args.width, k=args.k, generic_tokens=args.generic_tokens,
                      hp_repeat=args.hp_repeat, samples_per_prompt=args.samples_per_prompt, epochs=args.epochs,
                      seed=args.seed, eval_docs=args.eval_docs)
    if not cfg.layers or min(cfg.layers) < 0 or cfg.width < 1 or not 0 < cfg.k <= cfg.width:
        raise CLIError("need --layers ≥ 0, --width ≥ 1 and 0 < --k ≤ --width")
    try:
        mix_key = f"{args.model}-seed{cfg.seed}-g{cfg.generic_tokens}-r{cfg.hp_repeat}-s{cfg.samples_per_prompt}"
        card = run(cfg, args.model, args.out, args.work_dir / mix_key)
    except CorpusError as e:
        raise CLIError(str(e)) from None
    print(json.dumps({k: v for k, v in card.items() if k not in ("config", "compared")}, indent=2))
    return 0


def add_features(sub) -> None:
    pass
