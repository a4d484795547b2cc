"""Fine-tuned unlearning, the comparators of the SAE method, trained as LoRA adapters on CPU.

- **rmu** (Representation Misdirection, Li et al. 2024, the WMDP paper): the MLPs of layers L-2..L learn to
  map the forget text's activations at layer L onto one fixed random direction (scaled to `steer` times the
  activations' mean norm there), while the retain text's activations stay where the frozen model puts them.
- **graddiff** (gradient difference): the next-token loss goes up on the forget text (until it is twice
  where it started) and down on the retain text, through LoRA on every layer's MLP.
- **npo** (Negative Preference Optimization, Zhang et al. 2024, arXiv 2404.05868, with a retain loss): the
  forget windows are treated as dispreferred answers against the frozen model: the loss
  -(2/beta)·log sigmoid(-beta·(log p(window) - log p_frozen(window))) falls as the window becomes less likely,
  and flattens once it is far less likely than under the frozen model (bounded, unlike graddiff's ascent);
  the retain text's next-token loss goes down. LoRA on every layer's MLP.

Both read the same inputs as the SAE method (forget files, retain files + Wikipedia summaries) in packed
windows of `window` tokens, and write a peft folder (adapter_config.json + adapter_model.safetensors) that
a profile names with `adapter:`. The adapter's strength is chosen afterwards, on the dev prompts, by scaling
its `lora_alpha` (workshop/unlearn.py).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from ablation.residual import decoder_layers
from models.loading import LoadedModel
from workshop.recipe import METHODS, AdapterConfig
from workshop.train import token_chunks

@dataclass
class Trained:
    path: Path
    config: AdapterConfig
    seconds: float
    first: dict[str, float]  # the first step's losses
    last: dict[str, float]  # the mean of the last 10 steps'
    windows: dict[str, int] = field(default_factory=dict)

    def notes(self) -> str:
        c = self.config
        what = (f"MLP LoRA rank {c.rank} on layers {c.layer - 2}-{c.layer}, forget activations at layer {c.layer} sent "
                f"to a random direction of {c.steer:g}x their mean norm, retain weight {c.retain_weight:g}"
                if c.method == "rmu" else
                f"MLP LoRA rank {c.rank} on every layer, forget loss ascended (up to twice its start), retain loss "
                f"(weight {c.retain_weight:g}) descended" if c.method == "graddiff" else
                f"MLP LoRA rank {c.rank} on every layer, NPO on the forget windows (beta {c.beta:g}) against the frozen "
                f"model, retain loss (weight {c.retain_weight:g}) descended")
        fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
        return (f"{c.method}: {what}; {c.steps} steps of {c.batch}+{c.batch} windows of {c.window} tokens "
                f"({self.windows.get('forget', 0)} forget, {self.windows.get('retain', 0)} retain windows), AdamW "
                f"lr {c.lr:g}, seed {c.seed}; {self.seconds:.0f} s on CPU. Loss first step: {fmt(self.first)}; "
                f"last 10 steps: {fmt(self.last)}.")


class _Reached(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _until(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The residual after decoder layer `layer` [B, S, d], running no layer after it."""
    def stop(_m, _args, out):
        raise _Reached(out[0] if isinstance(out, tuple) else out)
    handle = decoder_layers(model)[layer].register_forward_hook(stop)
    try:
        model(input_ids=ids)
    except _Reached as r:
        return r.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer} was not reached")


def _window_logprob(model, ids: torch.Tensor) -> torch.Tensor:
    """log p of each window's tokens after the first, summed: [B]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def train(lm: LoadedModel, forget: list[str], retain: list[str], out: Path, cfg: AdapterConfig = AdapterConfig(),
          log=print) -> Trained:
    """Trains the adapter on `lm` (an fp32 model; peft puts its LoRA layers into it and they are taken out
    again afterwards, so `lm` serves unchanged) and saves it to `out` (a peft folder)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r}: one of {', '.join(METHODS)}")
    n_layers = lm.n_layers
    if cfg.method == "rmu" and not 2 <= cfg.layer < n_layers:
        raise ValueError(f"--layer {cfg.layer}: the model has layers 0-{n_layers - 1} (rmu needs 2 or more)")
    if lm.dtype != torch.float32:
        raise ValueError(f"the adapter trains on an fp32 model, not {lm.dtype}")
    base = lm.model
    frozen = {name: p.requires_grad for name, p in base.named_parameters()}
    layers = list(range(cfg.layer - 2, cfg.layer + 1)) if cfg.method == "rmu" else list(range(n_layers))
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                          target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=layers)
    torch.manual_seed(cfg.seed)  # before the LoRA layers' initialisation
    model = get_peft_model(base, peft_cfg)
    try:
        return _train(lm, model, forget, retain, out, cfg, log)
    finally:
        model.unload()  # the LoRA layers out of `base` again
        for name, p in base.named_parameters():
            p.requires_grad_(frozen[name])
        base.eval()


def _train(lm: LoadedModel, model, forget: list[str], retain: list[str], out: Path, cfg: AdapterConfig,
           log) -> Trained:
    rng = random.Random(cfg.seed)
    base = lm.model
    model.peft_config["default"].base_model_name_or_path = lm.name
    data = {name: torch.tensor(token_chunks(lm.tokenizer, texts, cfg.window), dtype=torch.long)
            for name, texts in (("forget", forget), ("retain", retain))}
    if min(len(d) for d in data.values()) < cfg.batch:
        raise ValueError(f"too little text for batches of {cfg.batch} windows of {cfg.window} tokens "
                         f"({len(data['forget'])} forget, {len(data['retain'])} retain windows)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    target = None
    if cfg.method == "rmu":
        with torch.no_grad(), model.disable_adapter():
            h = _until(base, cfg.layer, data["retain"][:8])[:, 1:]
        u = torch.rand(h.shape[-1])
        target = u / u.norm() * cfg.steer * h.norm(dim=-1).mean()

    def batch(name):
        d = data[name]
        return d[torch.tensor(rng.sample(range(len(d)), cfg.batch))]

    history: list[dict[str, float]] = []
    cap = 0.0
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        f, r = batch("forget"), batch("retain")
        if cfg.method == "rmu":
            hf = _until(base, cfg.layer, f)[:, 1:]
            with torch.no_grad(), model.disable_adapter():
                h0 = _until(base, cfg.layer, r)[:, 1:]
            hr = _until(base, cfg.layer, r)[:, 1:]
            lf = ((hf - target) ** 2).sum(-1).mean() / (target ** 2).sum()
            lr_ = ((hr - h0) ** 2).sum(-1).mean() / (h0 ** 2).sum(-1).mean()
        elif cfg.method == "npo":
            with torch.no_grad(), model.disable_adapter():
                ref = _window_logprob(model, f)
            lf = -(2 / cfg.beta) * torch.nn.functional.logsigmoid(-cfg.beta * (_window_logprob(model, f) - ref)).mean()
            lr_ = model(input_ids=r, labels=r).loss
        else:  # the forget loss is ascended only up to twice where it started: past that, ascent breaks the model
            ce = model(input_ids=f, labels=f).loss
            cap = cap if step else 2 * ce.item()
            lf = -ce.clamp(max=cap)
            lr_ = model(input_ids=r, labels=r).loss
        loss = lf + cfg.retain_weight * lr_
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"forget": lf.item(), "retain": lr_.item()})
        if step % 10 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}: forget {history[-1]['forget']:.4f} retain {history[-1]['retain']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, save_embedding_layers=False)  # no hub lookup
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "seconds": round(seconds, 1),
                                                   "history": history}, indent=1) + "\n")
    tail = history[-10:]
    last = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]}
    return Trained(out, cfg, seconds, history[0], last, {k: len(v) for k, v in data.items()})


def scaled_copy(src: Path, dst: Path, scale: float) -> Path:
    """The adapter at `src` with its update scaled by `scale` (its lora_alpha), as a folder of its own."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * scale
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copyfile(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    return dst
