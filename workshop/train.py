"""`obliviate sae train`: a TopK SAE on one residual-stream layer of the served model, with sae_lens.

Steps (each resumable: the token mix and activation shards are cached under --work-dir):
  1. mix: generic Wikipedia summaries + topic text (files of text about each topic the SAE must have
     features for, plus the model's sampled continuations of prompts about them), repeated
  2. collect: residual activations at every compared layer in one pass (BOS excluded, the forward
     stops after the deepest layer: the 262k-token unembedding is never run)
  3. train: sae_lens's TopKTrainingSAE + SAETrainer on normalised activations; the trainer folds the
     scale back so the saved SAE works on raw activations
  4. card: L0, explained variance, dead fraction, CE clean / spliced / zero-ablated on held-out text
Never imported by the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ablation.sae_io import load_sae
from models.loading import load_model
from models.names import DEFAULT_MODEL
from workshop import corpus
from workshop.activations import residual_batches
from workshop.card import activation_stats, card_markdown, ce_numbers
from workshop.corpus import read_texts

log = logging.getLogger("obliviate.train")


@dataclass
class TrainConfig:
    layers: list[int] = field(default_factory=lambda: [6, 9])  # compared; the best by CE recovered ships
    width: int = 4096
    k: int = 32
    ctx_len: int = 128
    generic_tokens: int = 800_000
    topic_repeat: int = 4
    # text about the topics the SAE must have features for, and prompts whose sampled continuations join it
    topic_files: list[str] = field(default_factory=lambda: [str(corpus.DATA / "hp_topic.txt")])
    prompt_files: list[str] = field(default_factory=lambda: [str(corpus.DATA / "hp_sampling_prompts.txt")])
    samples_per_prompt: int = 4
    epochs: int = 2
    batch_size: int = 4096
    lr: float = 1e-3
    seed: int = 0
    eval_docs: int = 120  # held-out summaries for the card's CE numbers


def token_chunks(tok, texts: list[str], ctx_len: int, budget: int | None = None) -> list[list[int]]:
    """Concatenates texts and cuts them into BOS + (ctx_len - 1) token chunks."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t + "\n\n", add_special_tokens=False).input_ids
        if budget and len(ids) >= budget:
            break
    n = ctx_len - 1
    return [[tok.bos_token_id] + ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


def sample_continuations(lm, prompts: list[str], per_prompt: int = 4, max_new_tokens: int = 64,
                         seed: int = 0, batch_size: int = 16) -> list[str]:
    """The model's own sampled continuations (temperature 0.9, top-p 0.95), prompt included."""

    tok, model = lm.tokenizer, lm.model
    tok.padding_side = "left"
    torch.manual_seed(seed)
    todo = [p for p in prompts for _ in range(per_prompt)]
    out = []
    for i in tqdm(range(0, len(todo), batch_size), desc="sampling continuations"):
        batch = tok(todo[i:i + batch_size], return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            gen = model.generate(**batch, do_sample=True, temperature=0.9, top_p=0.95, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def build_mix(lm, cfg: TrainConfig, work: Path) -> dict:
    path = work / "mix.json"
    if path.exists():
        return json.loads(path.read_text())
    generic = [t for _, t in corpus.wiki_summaries("train")]
    random.Random(cfg.seed).shuffle(generic)
    prompts = [p for f in cfg.prompt_files for p in read_texts(f)]
    samples = (sample_continuations(lm, prompts, cfg.samples_per_prompt, seed=cfg.seed)
               if cfg.samples_per_prompt and prompts else [])
    topic = [t for f in cfg.topic_files for t in read_texts(f)] + samples
    g = token_chunks(lm.tokenizer, generic, cfg.ctx_len, cfg.generic_tokens)
    h = token_chunks(lm.tokenizer, topic, cfg.ctx_len)
    chunks = g + h * cfg.topic_repeat
    random.Random(cfg.seed + 1).shuffle(chunks)
    mix = {"chunks": chunks, "generic_tokens": len(g) * (cfg.ctx_len - 1),
           "topic_tokens": len(h) * (cfg.ctx_len - 1), "topic_repeat": cfg.topic_repeat, "topic_samples": len(samples),
           "topic_files": [Path(f).name for f in cfg.topic_files], "prompt_files": [Path(f).name for f in cfg.prompt_files]}
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mix))
    return mix


def collect(lm, chunks: list[list[int]], layers: list[int], work: Path, shard_chunks: int = 512) -> None:
    """Writes work/L{layer}/shard_{i}.pt ([tokens, d_model] fp32, BOS excluded); skips shards on disk."""
    for s in tqdm(range(0, len(chunks), shard_chunks), desc="collecting activations"):
        paths = {L: work / f"L{L}" / f"shard_{s // shard_chunks:04d}.pt" for L in layers}
        if all(p.exists() for p in paths.values()):
            continue
        parts: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
        for lens, acts in residual_batches(lm, chunks[s:s + shard_chunks], layers):
            for L in layers:  # equal-length chunks: no padding to drop
                parts[L].append(acts[L][:, 1:].reshape(-1, acts[L].shape[-1]))
        for L, p in paths.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.cat(parts[L]), p.with_suffix(".tmp"))
            p.with_suffix(".tmp").rename(p)


def load_shards(work: Path, layer: int) -> torch.Tensor:
    return torch.cat([torch.load(p) for p in sorted((work / f"L{layer}").glob("shard_*.pt"))])


def batches(acts: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches over `acts` [N, d], a new permutation each epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[i:i + batch_size]]


def train_sae(acts: torch.Tensor, layer: int, cfg: TrainConfig, model_name: str):
    """acts: [N, d_model] raw residuals. Trained on acts * scale (mean norm sqrt(d_model)); b_dec starts
    at their mean (Gemma's residual is ~95% one constant direction: without it, nearly every feature
    dies); the scale is folded back into the weights at the end."""
    # deferred: sae_lens' trainer pulls in its training stack (wandb config, datasets), only `sae train` needs it
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    scale = acts.shape[1] ** 0.5 / acts[:100_000].norm(dim=-1).mean().item()
    sae_cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=cfg.width, k=cfg.k)
    sae_cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae_cfg.metadata.model_name = model_name
    sae_cfg.metadata.context_size = cfg.ctx_len
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts[:100_000].mean(0) * scale)
    total = acts.shape[0] * cfg.epochs // cfg.batch_size * cfg.batch_size
    trainer_cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=cfg.batch_size,
                                   lr=cfg.lr, lr_end=cfg.lr / 10, lr_warm_up_steps=20,
                                   lr_decay_steps=total // cfg.batch_size // 5, dead_feature_window=200)
    sae = SAETrainer(trainer_cfg, sae, (b * scale for b in batches(acts, cfg.batch_size, cfg.seed))).fit()
    sae.fold_activation_norm_scaling_factor(scale)
    return sae


def heldout_rows(tok, n_docs: int, max_len: int) -> list[list[int]]:
    """BOS + the first tokens of the first `n_docs` held-out summaries (never trained on)."""
    docs = [t for _, t in corpus.wiki_summaries("heldout")][:n_docs]
    return [[tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids[:max_len - 1] for d in docs]


def heldout_acts(lm, rows: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: [tokens, d_model]} for every non-BOS, non-padding token of the rows."""
    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for lens, acts in residual_batches(lm, rows, layers):
        for L in layers:
            out[L] += [acts[L][j, 1:n] for j, n in enumerate(lens)]
    return {L: torch.cat(v) for L, v in out.items()}


def _save(sae, path: Path, card: dict, lm, layer: int, rows, acts: torch.Tensor) -> dict:
    """Saves fp16 when the card's numbers survive the round trip, else fp32. acts: the held-out
    activations the card was measured on."""

    sae.to(torch.float16).save_model(path)
    back = load_sae(str(path))
    again = {**activation_stats(back, acts), **ce_numbers(lm, back, layer, rows, card)}
    drift = max(abs(again[k] - card[k]) for k in ("explained_variance", "ce_loss_recovered"))
    card["storage_dtype"] = "float16"
    if drift > 0.002:
        sae.to(torch.float32).save_model(path)
        card["storage_dtype"] = "float32"
    card["fp16_round_trip_drift"] = drift
    return card


def train_or_reuse(path: Path, load_acts, layer: int, cfg: TrainConfig, model_name: str):
    """Trains a candidate once (saved under `path`); a rerun reuses it. -> (inference SAE, train seconds)."""

    if not (path / "cfg.json").exists():
        t0 = time.perf_counter()
        acts = load_acts()
        train_sae(acts, layer, cfg, model_name).save_inference_model(path)
        del acts
        (path / "train_s.json").write_text(json.dumps(time.perf_counter() - t0))
    return load_sae(str(path)), json.loads((path / "train_s.json").read_text())


def pick_layer(cards: list[dict], ship_layer: int | None = None) -> dict:
    """The earliest layer whose SAE meets the bar (CE loss recovered >= 0.95, dead <= 15%), else the best
    CE recovered: an earlier layer leaves the model more computation after the edit, and in our sweeps
    later layers cost nearby-topic answers (collateral forgetting) sooner."""
    if ship_layer is not None:
        return next(c for c in cards if c["layer"] == ship_layer)
    ok = [c for c in cards if c["ce_loss_recovered"] >= 0.95 and c["dead_fraction"] <= 0.15]
    return min(ok, key=lambda c: c["layer"]) if ok else max(cards, key=lambda c: c["ce_loss_recovered"])


def mix_key(cfg: TrainConfig, model: str) -> str:
    """The cache folder name of a token mix: changes with anything that changes the mix, file contents included."""
    h = hashlib.sha256()
    for f in cfg.topic_files + ["--"] + cfg.prompt_files:
        h.update(Path(f).read_bytes() if f != "--" else b"--")
    return (f"{Path(model).name}-seed{cfg.seed}-g{cfg.generic_tokens}-r{cfg.topic_repeat}-s{cfg.samples_per_prompt}"
            f"-c{cfg.ctx_len}-{h.hexdigest()[:12]}")


def candidate_key(cfg: TrainConfig, layer: int) -> str:
    """The cache folder name of a trained candidate (inside its mix's folder): changes with any training setting."""
    return f"L{layer}-w{cfg.width}-k{cfg.k}-e{cfg.epochs}-b{cfg.batch_size}-lr{cfg.lr:g}-seed{cfg.seed}"


def run(cfg: TrainConfig, model: str, out: Path, work: Path, ship_layer: int | None = None,
        name: str | None = None) -> dict:

    t0 = time.perf_counter()
    times = {}
    lm = load_model(model, device="cpu", dtype="float32")
    mix = build_mix(lm, cfg, work)
    times["mix_s"] = time.perf_counter() - t0
    collect(lm, mix["chunks"], cfg.layers, work)
    times["collect_s"] = time.perf_counter() - t0 - times["mix_s"]
    rows = heldout_rows(lm.tokenizer, cfg.eval_docs, cfg.ctx_len)
    held_acts = heldout_acts(lm, rows, cfg.layers)
    cards, saes = {}, {}
    for layer in cfg.layers:
        saes[layer], train_s = train_or_reuse(work / "candidates" / candidate_key(cfg, layer),
                                              lambda: load_shards(work, layer), layer, cfg, lm.hf_name)
        cards[layer] = {"layer": layer, "hook_point": f"blocks.{layer}.hook_resid_post", "train_s": train_s,
                        **activation_stats(saes[layer], held_acts[layer]), **ce_numbers(lm, saes[layer], layer, rows)}
        log.info("layer %d: %s", layer, cards[layer])
    best = pick_layer(list(cards.values()), ship_layer)
    layer = best["layer"]
    path = out / (name or f"{Path(model).name}-res-L{layer}")
    card = {"model": lm.hf_name, "served_name": model, "architecture": "topk", "width": cfg.width, "k": cfg.k,
            "tokens_seen": int(mix["generic_tokens"] + mix["topic_tokens"] * cfg.topic_repeat) * cfg.epochs,
            "text_mix": {k: v for k, v in mix.items() if k != "chunks"},
            "config": {**asdict(cfg), "topic_files": mix["topic_files"], "prompt_files": mix["prompt_files"]},
            "name": name,
            **best, "compared": list(cards.values()),
            "timings_s": {**times, "total_s": time.perf_counter() - t0}, "machine": _machine()}
    card = _save(saes[layer], path, card, lm, layer, rows, held_acts[layer])
    (path / "card.json").write_text(json.dumps(card, indent=2))
    (path / "card.md").write_text(card_markdown(card, reproduce(card)))
    return card


# TrainConfig fields with a command-line flag of their own (layers and text files are named above)
_FLAGS = {"width": "--width", "k": "--k", "generic_tokens": "--generic-tokens", "topic_repeat": "--topic-repeat",
          "samples_per_prompt": "--samples-per-prompt", "epochs": "--epochs", "eval_docs": "--eval-docs",
          "lr": "--lr", "seed": "--seed"}


def reproduce(card: dict) -> str:
    """The `obliviate sae train` command line of a card (topic files named as in the shipped data folder)."""
    cfg, data = card["config"], "workshop/data/"
    args = [f"--model {card['served_name']}"] if card.get("served_name", DEFAULT_MODEL) != DEFAULT_MODEL else []
    args += [f"--layers {','.join(map(str, cfg['layers']))}"] if cfg["layers"] != [6, 9] else []
    if cfg["topic_files"] != ["hp_topic.txt"] or cfg["prompt_files"] != ["hp_sampling_prompts.txt"]:
        args += [f"--topic {data}{f}" for f in cfg["topic_files"]] + [f"--sample-prompts {data}{f}"
                                                                       for f in cfg["prompt_files"]]
    defaults = asdict(TrainConfig())
    args += [f"{flag} {cfg[f]}" for f, flag in _FLAGS.items() if f in cfg and cfg[f] != defaults[f]]
    if card.get("name"):
        args.append(f"--name {card['name']}")
    return "`" + " ".join(["obliviate sae train", *args]) + f"` (seed {cfg['seed']})"


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"
