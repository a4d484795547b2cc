"""Engine throughput under baseline vs SAE profiles, batch 1 and batch 8, in one process.

    python benchmarks/bench_engine.py [--sae DIR] [--tokens 64] [--prep]

Prints tokens/s per (profile, batch) and each profile's ratio to baseline at the same batch size.
--prep also times the one-time GGUF preparation (into a temporary cache) and the cached load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ablation.hooks import ProfileTable
from ablation.profiles import Intervention, ProfileSpec
from server.engine import Engine, SamplingParams, Sequence
from server.models import load_model, prepare_embedded

PROMPTS = ["The history of the Roman Empire", "Harry Potter walked into the Great Hall and",
           "Photosynthesis is the process by which", "In 1969 the first people to land on the Moon",
           "The recipe calls for two cups of flour,", "Hermione opened the book about",
           "The stock market fell sharply after", "A good night's sleep helps"]


def default_sae() -> str:
    return str(next(p for p in sorted((Path(__file__).parents[1] / "ablation" / "saes").glob("*")) if (p / "cfg.json").exists()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prep", action="store_true")
    ap.add_argument("--device")
    args = ap.parse_args()
    if args.prep:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            prepare_embedded(Path(tmp))
            prep = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_model("gemma-3-270m", Path(tmp), args.device)
            print(f"model prep (GGUF -> HF folder, once): {prep:.1f} s; load from cache: {time.perf_counter() - t0:.1f} s")
    lm = load_model("gemma-3-270m", device=args.device)
    sae = args.sae or default_sae()
    import json
    hook = json.loads((Path(sae) / "cfg.json").read_text())["metadata"]["hook_name"]
    profiles = {"baseline": ProfileSpec(name="baseline"),
                "sae_only": ProfileSpec(name="sae_only", interventions=[Intervention(hookpoint=hook, sae=sae)])}
    engine = Engine(lm, ProfileTable(profiles, lm.device, lm.dtype), max_batch_size=8)
    tok = lm.tokenizer

    def run(profile: str, batch: int) -> float:
        seqs = [Sequence([tok.bos_token_id], tok(p, add_special_tokens=False).input_ids, engine.table.index[profile],
                         SamplingParams(max_tokens=args.tokens, temperature=0, stop=()), emit=lambda ev: None)
                for p in PROMPTS[:batch]]
        engine.submit(seqs)
        engine.waiting.clear()
        t0 = time.perf_counter()
        engine.generate(seqs)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return sum(len(s.out) for s in seqs) / (time.perf_counter() - t0)

    run("baseline", 2)  # warm-up
    print(f"device {lm.device}, dtype {lm.dtype}, threads {torch.get_num_threads()}, {args.tokens} new tokens/row, SAE {sae}")
    for batch in (1, 8):
        base = run("baseline", batch)
        for profile in ("baseline", "sae_only"):
            tps = base if profile == "baseline" else run(profile, batch)
            print(f"batch {batch}  {profile:9s} {tps:7.1f} tok/s  ratio to baseline {tps / base:.3f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
