"""Profiles as residual-stream hooks.

`ProfileTable` compiles every served profile to tensors once. `ResidualHook` is the one hook
function: installed once per intervened hook point, it applies each token's own profile, running
the SAE only on the tokens that need it. What it needs to know about a forward (which tokens carry
which profile, where sequences start, the `sequence` condition's state) arrives in a `HookContext`
that the engine builds for that forward and hands to the model as the keyword argument
CONTEXT_KWARG; the hook leaves the updated state in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE

from ablation.edit import EditTensors, apply_edits
from ablation.residual import Hookpoint, ResidualFn
from ablation.sae_io import load_sae
from ablation.spec import ProfileSpec

CONTEXT_KWARG = "hook_ctx"


@dataclass
class HookEntry:
    profile: int  # index into ProfileTable.names
    sae: SAE
    edit: EditTensors


class ProfileTable:
    def __init__(self, profiles: dict[str, ProfileSpec], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.specs = profiles
        self.names = list(profiles)
        self.index = {n: i for i, n in enumerate(self.names)}
        saes: dict[str, SAE] = {}  # one copy of each SAE, shared by the profiles that use it
        self.by_hook: dict[Hookpoint, list[HookEntry]] = {}
        for name, spec in profiles.items():
            for iv in spec.interventions:
                if iv.sae not in saes:
                    saes[iv.sae] = load_sae(iv.sae, device=str(device), dtype=dtype)
                entry = HookEntry(self.index[name], saes[iv.sae], EditTensors.from_intervention(iv, device))
                self.by_hook.setdefault(Hookpoint.parse(iv.hookpoint), []).append(entry)
        self.saes = saes

    def check_model(self, n_layers: int, d_model: int) -> None:
        for hp, entries in self.by_hook.items():
            if hp.layer >= n_layers:
                raise ValueError(f"hookpoint {hp} does not exist: the model has {n_layers} layers")
            for e in entries:
                if e.sae.cfg.d_in != d_model:
                    raise ValueError(
                        f"profile {self.names[e.profile]!r}: SAE d_in {e.sae.cfg.d_in} != model width {d_model}"
                    )
                if e.edit.features.numel() and int(e.edit.features.max()) >= e.sae.cfg.d_sae:
                    raise ValueError(
                        f"profile {self.names[e.profile]!r}: feature {int(e.edit.features.max())} "
                        f">= SAE width {e.sae.cfg.d_sae}"
                    )

    def layer_hooks(self) -> dict[Hookpoint, ResidualFn]:
        """One hook function per intervened hook point, reading the context from the layer's kwargs."""
        return {hp: ResidualHook(hp, entries).on_layer for hp, entries in self.by_hook.items()}


@dataclass
class HookContext:
    """One forward's tokens, flattened to [N] in the order of the activations the hooks see."""

    rows_for: dict[int, torch.Tensor]  # profile index -> indices [n] of its tokens
    seq: torch.Tensor  # [N] long: the sequence each token belongs to (contiguous, in order)
    first: torch.Tensor  # [N] bool: position 0 (BOS)
    fired: dict[Hookpoint, torch.Tensor]  # [R] bool per hook point: fired earlier in the sequence; updated
    prompt: torch.Tensor | None = None  # [N] bool: a prompt token (False: one the model generated); None: all

    @classmethod
    def build(cls, profiles: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor,
              fired: dict[Hookpoint, torch.Tensor], device: torch.device | str,
              prompt: torch.Tensor | None = None) -> "HookContext":
        """profiles, seq, positions, prompt: [N] per token (any device) -> the context on `device`."""
        profiles = profiles.cpu()
        rows_for = {p: (profiles == p).nonzero().squeeze(-1).to(device) for p in profiles.unique().tolist()}
        return cls(rows_for, seq.to(device), positions.to(device) == 0, fired,
                   None if prompt is None else prompt.to(device))


class ResidualHook:
    def __init__(self, hookpoint: Hookpoint, entries: list[HookEntry]):
        self.hookpoint = hookpoint
        self.entries = entries

    def __call__(self, x: torch.Tensor, ctx: HookContext | None) -> torch.Tensor:
        """x: [..., d_model] (the context's N tokens) -> the residual with each token's profile applied."""
        if ctx is None:
            return x
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for e in self.entries:
            idx = ctx.rows_for.get(e.profile)
            if idx is None or e.edit.is_noop:
                continue
            valid = ~ctx.first[idx] if e.edit.skip_bos else None
            prompt = None if ctx.prompt is None else ctx.prompt[idx]
            y, fired = apply_edits(flat[idx], e.sae, e.edit, valid, ctx.fired.get(self.hookpoint), ctx.seq[idx],
                                   prompt)
            if fired is not None:
                ctx.fired[self.hookpoint] = fired
            out = flat.clone() if out is None else out
            out[idx] = y
        return x if out is None else out.view_as(x)

    def on_layer(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """As installed by residual_hooks: the context comes with the layer's keyword arguments."""
        return self(x, kwargs.get(CONTEXT_KWARG))
