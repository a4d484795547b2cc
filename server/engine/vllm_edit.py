"""The residual edit inside vLLM's model, where its compiled mode keeps it.

vLLM compiles its model's forward once (torch.compile; on a GPU it also captures CUDA graphs), so a
Python hook installed afterwards never runs and one that branches per batch cannot be traced. The
edit is therefore placed when the model is loaded, before anything is compiled: the model loader
`obliviate` (vLLM's own loader, plus this) puts one call of the opaque custom op `obliviate::edit` at
every boundary of the decoder layers (the input of layer 0, and each layer's output). The compiled graph
keeps the call as it is; at run time the op looks its boundary up in vLLM's forward context (as vLLM's
attention op finds its layer) and applies what the worker has installed there for this forward's
batch; a boundary with nothing installed costs one call that does nothing. vLLM's layers carry the
stream as (hidden, residual) whose sum it is: an edited stream is written back in place as (0, x').
On a GPU the op is one of vLLM's splitting ops, so CUDA graphs capture the pieces between boundaries
and the edit itself runs eagerly.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.config import VllmConfig
from vllm.config.load import LoadConfig
from vllm.config.model import ModelConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from ablation.residual import Hookpoint, ResidualFn, decoder_layers

LOAD_FORMAT = "obliviate"
EDIT_VERSION = 1  # in vLLM's config hash (its compile cache): a new layout of the boundaries gets new graphs
OP = "obliviate::edit"
PREFIX = "obliviate.boundary."  # + b: the boundary before layer b (b = number of layers: after the last)


class Boundary:
    """Between decoder layers b-1 and b: the hook points there in stream order (layer b-1's output, then
    layer b's input) and the hook function installed at each."""

    def __init__(self, hookpoints: list[Hookpoint]):
        self.hookpoints = hookpoints
        self.fns: dict[Hookpoint, ResidualFn] = {}

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        fns = [self.fns[hp] for hp in self.hookpoints if hp in self.fns]
        if not fns:
            return
        x = hidden if residual is None else hidden + residual
        y = x
        for fn in fns:
            y = fn(y, {})
        if y is x:
            return
        if residual is None:
            hidden.copy_(y)
        else:
            residual.copy_(y)
            hidden.zero_()


@torch.library.custom_op(OP, mutates_args=("hidden", "residual"))
def edit(hidden: torch.Tensor, residual: torch.Tensor | None, boundary: str) -> None:
    get_forward_context().no_compile_layers[boundary](hidden, residual)


@edit.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor | None, boundary: str) -> None:
    return None


def place_boundaries(model: torch.nn.Module, forward_context: dict) -> list[Boundary]:
    """One `obliviate::edit` call at each layer boundary of `model` (a vLLM decoder model), each boundary
    registered in `forward_context` (vLLM's static forward context) by its name -> the boundaries, in
    order."""
    layers = decoder_layers(model)
    n = len(layers)
    boundaries = []
    for b in range(n + 1):
        hps = ([Hookpoint(b - 1, "post")] if b > 0 else []) + ([Hookpoint(b, "pre")] if b < n else [])
        name = f"{PREFIX}{b}"
        if name in forward_context:
            raise ValueError(f"{name} is already in vLLM's forward context")
        forward_context[name] = boundary = Boundary(hps)
        boundaries.append(boundary)

    def before(name: str):
        def hook(_m, args):  # args: (positions, hidden, residual or None at layer 0)
            torch.ops.obliviate.edit(args[1], args[2], name)
        return hook

    def after(name: str):
        def hook(_m, _args, out):  # out: (hidden, residual)
            torch.ops.obliviate.edit(out[0], out[1], name)
        return hook

    layers[0].register_forward_pre_hook(before(f"{PREFIX}0"))
    for b, layer in enumerate(layers):
        layer.register_forward_hook(after(f"{PREFIX}{b + 1}"))
    return boundaries


def install(boundaries: list[Boundary], fns: dict[Hookpoint, ResidualFn]) -> None:
    """Sets the hook function of each hook point in `fns` (raises on one the model does not have)."""
    where = {hp: b for b in boundaries for hp in b.hookpoints}
    for hp in fns:
        if hp not in where:
            raise ValueError(f"hookpoint {hp} does not exist: the model has {len(boundaries) - 1} layers")
    for hp, fn in fns.items():
        where[hp].fns[hp] = fn


def boundaries_of(model: torch.nn.Module) -> list[Boundary]:
    """The boundaries the `obliviate` loader placed in `model` (raises if it was loaded otherwise)."""
    got = getattr(model, "obliviate_boundaries", None)
    if got is None:
        raise RuntimeError(f"the model was not loaded with load_format={LOAD_FORMAT!r}: it has no edit boundaries")
    return got


@register_model_loader(LOAD_FORMAT)
class EditLoader(DefaultModelLoader):
    """vLLM's default loader (safetensors), with the edit boundaries placed before anything compiles."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(dataclasses.replace(load_config, load_format="auto"))

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, **kwargs) -> torch.nn.Module:
        model = super().load_model(vllm_config=vllm_config, model_config=model_config, **kwargs)
        model.obliviate_boundaries = place_boundaries(model, vllm_config.compilation_config.static_forward_context)
        return model
