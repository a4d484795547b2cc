"""LoRA adapters (peft format) as a profile's weight edit, served per row beside the SAE edits.

A profile may name a folder holding `adapter_config.json` and `adapter_model.safetensors` (what peft's
`save_pretrained` writes). Each adapted linear layer gets one forward hook; it adds
`scale * (x @ A.T) @ B.T` to the rows of the profiles that use an adapter there, one batched update per
profile (never a loop over rows), the same update peft's `merge_and_unload` folds into the weights.
Which rows carry which profile comes from the forward's HookContext, as for the residual hooks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ablation.spec import model_matches

PEFT_PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_RANK = 64  # the largest LoRA rank served (vLLM's --max-lora-rank default is 16; its largest 512)


class AdapterError(ValueError):
    """An adapter folder that cannot be served; the message names the folder and the problem."""


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass(frozen=True)
class Adapter:
    path: str
    base_model: str | None
    rank: int
    modules: dict[str, LoraWeights]  # module path in the *ForCausalLM ("model.layers.3.mlp.up_proj") -> weights


def adapter_rank(path: str | Path) -> int:
    """An adapter folder's LoRA rank from its config (0 where it cannot be read: load_adapter says why)."""
    try:
        return int(json.loads((Path(path) / CONFIG).read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def load_adapter(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_rank: int = MAX_RANK) -> Adapter:
    """A peft LoRA folder -> its weights per module; AdapterError for anything this server cannot apply
    exactly (DoRA, per-module alphas, biases, fan-in-fan-out layouts, a rank over `max_rank`)."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise AdapterError(f"adapter {path}: {name} not found (a peft LoRA folder has {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads((path / CONFIG).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except (OSError, ValueError) as e:  # not JSON, not safetensors, a directory...
        raise AdapterError(f"adapter {path}: cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are served")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "alpha_pattern", "rank_pattern", "lora_bias",
                               "modules_to_save", "layer_replication") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise AdapterError(f"adapter {path}: {', '.join(unsupported)} not supported (train a plain LoRA)")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    if r > max_rank:
        raise AdapterError(f"adapter {path}: rank {r} is over the limit {max_rank}")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                module = name.split(f".{part}.")[0]
                pairs.setdefault(module, {})[part] = t.to(device=device, dtype=dtype)
    if not pairs:
        raise AdapterError(f"adapter {path}: no lora_A/lora_B weights in {WEIGHTS}")
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"} or ab["lora_A"].shape[0] != ab["lora_B"].shape[1]:
            raise AdapterError(f"adapter {path}: {module} needs lora_A [r, in] and lora_B [out, r] of one rank")
        modules[module] = LoraWeights(ab["lora_A"], ab["lora_B"], scale)
    return Adapter(str(path), cfg.get("base_model_name_or_path"), r, modules)


def check_adapter(adapter: Adapter, model: torch.nn.Module, served: str) -> None:
    """Raises AdapterError unless every adapted module is a linear layer of `model` of the adapter's shape
    (so an adapter trained for another base model fails here, at start-up, not in a forward)."""
    named = dict(model.named_modules())
    for module, w in adapter.modules.items():
        layer = named.get(module)
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterError(f"adapter {adapter.path}: {module} is not a linear layer of {served}"
                               + (f" (it was trained for {adapter.base_model})" if adapter.base_model else ""))
        if (layer.out_features, layer.in_features) != (w.b.shape[0], w.a.shape[1]):
            raise AdapterError(f"adapter {adapter.path}: {module} is [{w.b.shape[0]}, {w.a.shape[1]}] but the model's "
                               f"is [{layer.out_features}, {layer.in_features}]"
                               + (f" (trained for {adapter.base_model}, served: {served})"
                                  if adapter.base_model and not model_matches(adapter.base_model, served) else ""))


@dataclass
class AdapterEntry:
    profile: int  # index into ProfileTable.installed
    weights: LoraWeights


class AdapterHook:
    """The forward hook of one adapted linear layer: each profile's low-rank update on its own rows."""

    def __init__(self, entries: list[AdapterEntry], context: Callable[[], object]):
        self.entries, self.context = entries, context

    def __call__(self, _module, args, out: torch.Tensor) -> torch.Tensor | None:
        ctx = self.context()
        if ctx is None:
            return None
        x = args[0].reshape(-1, args[0].shape[-1])
        flat = None
        for e in self.entries:
            idx = ctx.rows_for.get(e.profile)
            if idx is None:
                continue
            w = e.weights
            delta = (x[idx] @ w.a.T) @ w.b.T
            flat = out.reshape(-1, out.shape[-1]).clone() if flat is None else flat
            flat.index_add_(0, idx, delta, alpha=w.scale)
        return None if flat is None else flat.view_as(out)


@contextmanager
def adapter_hooks(model: torch.nn.Module, by_module: dict[str, list[AdapterEntry]],
                  context: Callable[[], object], modules: list[str] | None = None) -> Iterator[None]:
    """One AdapterHook per adapted module (or per one of `modules`) while the block lasts."""
    named = dict(model.named_modules())
    handles = [named[m].register_forward_hook(AdapterHook(by_module[m], context)) for m in (modules or by_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ForwardContext:
    """The HookContext of the forward running now, for hooks on modules that get no keyword arguments
    (linear layers): set by a pre-hook on the decoder stack from the context it is called with, cleared
    when that forward returns."""

    def __init__(self, kwarg: str):
        self.kwarg = kwarg
        self.current = None

    def __call__(self):
        return self.current

    @contextmanager
    def installed(self, stack: torch.nn.Module) -> Iterator[None]:
        def enter(_m, _args, kwargs):
            self.current = kwargs.get(self.kwarg)

        def leave(_m, _args, _kwargs, _out):
            self.current = None

        handles = [stack.register_forward_pre_hook(enter, with_kwargs=True),
                   stack.register_forward_hook(leave, with_kwargs=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.current = None
