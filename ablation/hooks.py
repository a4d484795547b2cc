"""Profiles as residual-stream hooks.

`ProfileTable` compiles every served profile to tensors once. `ResidualHook` is the one hook
function: installed once per intervened hook point, it applies each token's own profile, running
the SAE only on the tokens that need it. What it needs to know about a forward (which tokens carry
which profile, where sequences start, the `sequence` condition's state) arrives in a `HookContext`
that the engine builds for that forward and hands to the model as the keyword argument
CONTEXT_KWARG; the hook leaves the updated state in it, and the trigger audit: the first position in
each sequence at which a profile's edit fired in this forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # deferred: the type only (sae_lens, with transformer_lens, takes 13 s to import)
    from sae_lens import SAE

from ablation.adapters import Adapter, AdapterEntry, check_adapter, load_adapter
from ablation.edit import EditTensors, apply_edits, encode
from ablation.residual import Hookpoint, ResidualFn
from ablation.sae_io import load_direction, load_sae, sae_dims
from ablation.spec import ProfileSpec

CONTEXT_KWARG = "hook_ctx"


@dataclass
class HookEntry:
    profile: int  # index into ProfileTable.installed
    sae: SAE
    edit: EditTensors


@dataclass
class Compiled:
    """A profile loaded: its interventions (SAEs loaded) and its adapter (None: none)."""
    interventions: list[tuple[Hookpoint, SAE, EditTensors]]
    adapter: Adapter | None = None


class ProfileTable:
    """The served profiles as hook entries. Profiles can be added and removed while an engine runs: an
    index is never reused, so a request keeps the profile it started with; a removed profile's entries
    stay until `prune` finds no request using them. The engine calls install/remove/prune between
    forwards; compile (which loads SAEs) may run on any thread."""

    def __init__(self, profiles: dict[str, ProfileSpec], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, load: bool = True):
        """load=False: the specs only, no SAE loaded (a process that does not run the model, such as the
        vLLM engine's server process: its workers load their own)."""
        self.device, self.dtype, self.load = device, dtype, load
        self.specs: dict[str, ProfileSpec] = {}  # what new requests may use
        self.index: dict[str, int] = {}
        self.installed: list[ProfileSpec] = []  # index -> spec, removed ones included
        self.saes: dict[str, SAE] = {}  # one copy of each SAE, shared by the profiles that use it
        self.by_hook: dict[Hookpoint, list[HookEntry]] = {}
        self.adapters: dict[str, Adapter] = {}  # one copy of each adapter, by folder
        self.by_module: dict[str, list[AdapterEntry]] = {}  # adapted linear layer -> its profiles' weights
        self.model: tuple[torch.nn.Module, str] | None = None  # (the model, its name), once adapters are checked
        self.dims: tuple[int, int] | None = None  # (layers, width) of the model, once checked
        self.retired: set[int] = set()  # removed profiles whose entries may still be in use
        for name, spec in profiles.items():
            self.install(name, spec, self.compile(spec))

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def compile(self, spec: ProfileSpec) -> Compiled:
        if not self.load:
            return Compiled([])
        out = []
        for iv in spec.interventions:
            if iv.sae not in self.saes:
                self.saes[iv.sae] = load_sae(iv.sae, device=str(self.device), dtype=self.dtype)
            sae = self.saes[iv.sae]
            direction = None if iv.steer is None else load_direction(iv.steer.vector, sae.cfg.d_in, str(self.device))
            edit = EditTensors.from_intervention(iv, self.device, direction)
            out.append((Hookpoint.parse(iv.hookpoint), self.saes[iv.sae], edit))
        if self.dims:
            self._check(spec.name, out)
        adapter = None
        if spec.adapter:
            adapter = self.adapters.get(spec.adapter) or load_adapter(spec.adapter, self.device, self.dtype)
            self.adapters[spec.adapter] = adapter
            if self.model:
                check_adapter(adapter, *self.model)
        return Compiled(out, adapter)

    def install(self, name: str, spec: ProfileSpec, compiled: Compiled) -> tuple[list[Hookpoint], list[str]]:
        """-> the hook points and adapted modules no profile used before (the engine hooks them)."""
        i = len(self.installed)
        self.installed.append(spec)
        self.specs[name], self.index[name] = spec, i
        new = [hp for hp, _, _ in compiled.interventions if hp not in self.by_hook]
        for hp, sae, edit in compiled.interventions:
            self.by_hook.setdefault(hp, []).append(HookEntry(i, sae, edit))
        modules = compiled.adapter.modules if compiled.adapter else {}
        new_modules = [m for m in modules if m not in self.by_module]
        for m, w in modules.items():
            self.by_module.setdefault(m, []).append(AdapterEntry(i, w))
        return new, new_modules

    def remove(self, name: str) -> int:
        """New requests can no longer use `name`; -> its index (requests that have it keep it)."""
        del self.specs[name]
        index = self.index.pop(name)
        self.retired.add(index)
        return index

    def prune(self, in_use: set[int]) -> None:
        """Drops the entries (and SAEs) of removed profiles that no request in `in_use` still has."""
        self.retired &= in_use
        keep = set(self.index.values()) | in_use
        for entries in [*self.by_hook.values(), *self.by_module.values()]:
            entries[:] = [e for e in entries if e.profile in keep]  # in place: the hooks hold these lists
        used = {id(e.sae) for entries in self.by_hook.values() for e in entries}
        self.saes = {ref: sae for ref, sae in self.saes.items() if id(sae) in used}
        kept = {self.installed[i].adapter for i in keep}
        self.adapters = {ref: a for ref, a in self.adapters.items() if ref in kept}

    def check_adapters(self, model: torch.nn.Module, served: str) -> None:
        """Every adapter (and each one compiled later) against the model's linear layers."""
        self.model = (model, served)
        for adapter in self.adapters.values():
            check_adapter(adapter, model, served)

    def guarded(self) -> torch.Tensor:
        """[installed + 1] bool: the profiles with the markup guard (the last entry: no profile)."""
        return torch.tensor([s.markup_guard for s in self.installed] + [False])

    def check_model(self, n_layers: int, d_model: int) -> None:
        self.dims = (n_layers, d_model)
        for hp, entries in self.by_hook.items():
            for e in entries:
                self._check(self.installed[e.profile].name, [(hp, e.sae, e.edit)])
        if not self.load:  # from the SAEs' configs
            for spec in self.installed:
                for iv in spec.interventions:
                    dims = sae_dims(iv.sae)
                    if dims:
                        top = max((ed.feature for ed in iv.edits), default=-1)
                        self._fits(spec.name, Hookpoint.parse(iv.hookpoint), *dims, top)

    def _check(self, name: str, compiled: list[tuple[Hookpoint, SAE, EditTensors]]) -> None:
        for hp, sae, edit in compiled:
            top = int(edit.features.max()) if edit.features.numel() else -1
            self._fits(name, hp, sae.cfg.d_in, sae.cfg.d_sae, top)

    def _fits(self, name: str, hp: Hookpoint, d_in: int, d_sae: int, top_feature: int) -> None:
        n_layers, d_model = self.dims
        if hp.layer >= n_layers:
            raise ValueError(f"hookpoint {hp} does not exist: the model has {n_layers} layers")
        if d_in != d_model:
            raise ValueError(f"profile {name!r}: SAE d_in {d_in} != model width {d_model}")
        if top_feature >= d_sae:
            raise ValueError(f"profile {name!r}: feature {top_feature} >= SAE width {d_sae}")

    def layer_hooks(self, hookpoints: list[Hookpoint] | None = None,
                    context: Callable[[], HookContext | None] | None = None) -> dict[Hookpoint, ResidualFn]:
        """One hook function per intervened hook point (or per one of `hookpoints`), reading the context
        from the layer's kwargs, or from `context()` where the model does not hand kwargs on to its layers
        (vLLM's Llama)."""
        hooks = {hp: ResidualHook(hp, self.by_hook[hp]) for hp in (hookpoints or self.by_hook)}
        if context is None:
            return {hp: h.on_layer for hp, h in hooks.items()}
        return {hp: (lambda x, _kwargs, h=h: h(x, context())) for hp, h in hooks.items()}


NOT_FIRED = torch.iinfo(torch.long).max  # in HookContext.trigger: no edit fired in the sequence


@dataclass
class HookContext:
    """One forward's tokens, flattened to [N] in the order of the activations the hooks see."""

    rows_for: dict[int, torch.Tensor]  # profile index -> indices [n] of its tokens
    seq: torch.Tensor  # [N] long: the sequence each token belongs to (contiguous, in order)
    positions: torch.Tensor  # [N] long: each token's position in its sequence (0: BOS)
    fired: dict[Hookpoint, torch.Tensor]  # [R] bool per hook point: fired earlier in the sequence; updated
    prompt: torch.Tensor | None = None  # [N] bool: a prompt token (False: one the model generated); None: all
    trigger: torch.Tensor | None = None  # [R] long: the first position where an edit fired in this forward

    @classmethod
    def build(cls, profiles: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor,
              fired: dict[Hookpoint, torch.Tensor], device: torch.device | str,
              prompt: torch.Tensor | None = None, audit: bool = True) -> "HookContext":
        """profiles, seq, positions, prompt: [N] per token (any device) -> the context on `device`; audit:
        keep where each sequence's edit first fired (else `triggers` says None for every sequence)."""
        profiles = profiles.cpu()
        rows_for = {p: (profiles == p).nonzero().squeeze(-1).to(device) for p in profiles.unique().tolist()}
        seq = seq.to(device)
        trigger = torch.full((int(seq.max()) + 1 if seq.numel() else 0,), NOT_FIRED, dtype=torch.long,
                             device=device) if audit else None
        return cls(rows_for, seq, positions.to(device).long(), fired, None if prompt is None else prompt.to(device),
                   trigger)

    @property
    def first(self) -> torch.Tensor:
        """[N] bool: position 0 (BOS)."""
        return self.positions == 0

    def note_fired(self, idx: torch.Tensor, hit: torch.Tensor) -> None:
        """Tokens `idx` where an edit fired (hit: [n] bool) -> the earliest such position per sequence."""
        if self.trigger is None:
            return
        at = torch.where(hit.reshape(-1), self.positions[idx], NOT_FIRED)
        self.trigger.scatter_reduce_(0, self.seq[idx], at, "amin")

    def triggers(self, n: int) -> list[int | None]:
        """The first n sequences' first firing positions in this forward (None: none fired)."""
        if self.trigger is None:
            return [None] * n
        return [None if t == NOT_FIRED else t for t in self.trigger[:n].tolist()]


class ResidualHook:
    def __init__(self, hookpoint: Hookpoint, entries: list[HookEntry]):
        self.hookpoint = hookpoint
        self.entries = entries

    def __call__(self, x: torch.Tensor, ctx: HookContext | None) -> torch.Tensor:
        """x: [..., d_model] (the context's N tokens) -> the residual with each token's profile applied.
        The profiles that share an SAE here are encoded together: one pass over its encoder for all their
        tokens (a profile with several interventions at this hook point applies them in turn: its k-th
        ones form the k-th wave, which starts from the residual the waves before it left)."""
        if ctx is None:
            return x
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for wave in self._waves(ctx):
            cur = flat if out is None else out
            for sae, group in wave.values():
                acts = encode(sae, cur[torch.cat([idx for _, idx in group]) if len(group) > 1 else group[0][1]])
                at = 0
                for e, idx in group:
                    n = idx.shape[0]
                    valid = ~ctx.first[idx] if e.edit.skip_bos else None
                    prompt = None if ctx.prompt is None else ctx.prompt[idx]
                    y, fired, hit = apply_edits(cur[idx], sae, e.edit, valid, ctx.fired.get(self.hookpoint),
                                                ctx.seq[idx], prompt, acts[at:at + n])
                    at += n
                    if fired is not None:
                        ctx.fired[self.hookpoint] = fired
                    ctx.note_fired(idx, hit)
                    out = flat.clone() if out is None else out
                    out[idx] = y
        return x if out is None else out.view_as(x)

    def _waves(self, ctx: HookContext) -> list[dict[int, tuple[SAE, list[tuple[HookEntry, torch.Tensor]]]]]:
        """The entries with tokens in this forward, as waves of {SAE id: (SAE, [(entry, its token indices)])}."""
        waves: list[dict] = []
        seen: dict[int, int] = {}  # profile -> its entries so far
        for e in self.entries:
            idx = ctx.rows_for.get(e.profile)
            if idx is None or e.edit.is_noop:
                continue
            k = seen[e.profile] = seen.get(e.profile, -1) + 1
            if k == len(waves):
                waves.append({})
            waves[k].setdefault(id(e.sae), (e.sae, []))[1].append((e, idx))
        return waves

    def on_layer(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """As installed by residual_hooks: the context comes with the layer's keyword arguments."""
        return self(x, kwargs.get(CONTEXT_KWARG))
