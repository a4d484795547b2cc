"""Residual-stream plumbing for transformers decoder models: hook points parsed once into a value,
hooks installed and removed in one context manager, and right-padded token batches.

`blocks.L.hook_resid_pre` is decoder layer L's input, `blocks.L.hook_resid_post` its output
(TransformerLens names, the names SAE releases are trained on).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

_HOOKPOINT = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")

# fn(x [B, S, d_model], the layer's keyword arguments) -> the residual to continue with
ResidualFn = Callable[[torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class Hookpoint:
    layer: int
    kind: Literal["pre", "post"]

    @classmethod
    def parse(cls, name: str) -> "Hookpoint":
        m = _HOOKPOINT.match(name or "")
        if not m:
            raise ValueError(f"hookpoint {name!r} is not supported; use blocks.<L>.hook_resid_pre "
                             f"or blocks.<L>.hook_resid_post")
        return cls(int(m.group(1)), m.group(2))

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_{self.kind}"

    def __str__(self) -> str:
        return self.name


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers *ForCausalLM (or of its inner model)."""
    inner = getattr(model, "model", model)
    return inner.layers


@contextmanager
def residual_hooks(model: torch.nn.Module, fns: dict[Hookpoint, ResidualFn]) -> Iterator[None]:
    """Runs fns[hp](x, kwargs) on the residual at each hook point while the block lasts; raises on a
    hook point the model does not have. (vLLM's models: server/engine/vllm_edit.py.)"""
    layers = decoder_layers(model)
    handles = []
    try:
        for hp, fn in fns.items():
            if not 0 <= hp.layer < len(layers):
                raise ValueError(f"hookpoint {hp} does not exist: the model has {len(layers)} layers")
            hook = _post if hp.kind == "post" else _pre
            module = layers[hp.layer]
            if hp.kind == "post":
                handles.append(module.register_forward_hook(hook(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_pre_hook(hook(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _post(fn: ResidualFn):
    def hook(_m, _args, kwargs, out):
        if isinstance(out, tuple):
            return (fn(out[0], kwargs),) + out[1:]
        return fn(out, kwargs)
    return hook


def _pre(fn: ResidualFn):
    def hook(_m, args, kwargs):
        if args:
            return (fn(args[0], kwargs),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"], kwargs)}
    return hook


def pad_right(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, S], attention mask [B, S]), each row at the left, padding after it."""
    S = max(map(len, rows))
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask
