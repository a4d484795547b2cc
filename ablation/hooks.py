"""Profiles as residual-stream hooks.

`ProfileTable` compiles every served profile to tensors once. `ResidualHook` is the one hook
function: installed once per intervened hook point, it reads which profile each batch row carries
from a `BatchState` and applies that row's own edit, running the SAE only on rows that need it.
`ablated(hooked_transformer, profile)` applies one profile to a TransformerLens model (reference
runs, discovery, SAE cards).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from sae_lens import SAE

from ablation.edit import EditTensors, apply_edits
from ablation.profiles import HOOKPOINT_RE, ProfileSpec
from ablation.saes import load_sae


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
        self.by_hook: dict[str, list[HookEntry]] = {}
        for name, spec in profiles.items():
            for iv in spec.interventions:
                if iv.sae not in saes:
                    saes[iv.sae] = load_sae(iv.sae, device=str(device), dtype=dtype)
                entry = HookEntry(self.index[name], saes[iv.sae], EditTensors.from_intervention(iv, device))
                self.by_hook.setdefault(iv.hookpoint, []).append(entry)
        self.saes = saes

    def check_model(self, n_layers: int, d_model: int) -> None:
        for hp, entries in self.by_hook.items():
            layer = int(HOOKPOINT_RE.match(hp).group(1))
            if layer >= n_layers:
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


@dataclass
class BatchState:
    """What the hooks need to know about the batch in flight; the engine fills it."""

    rows_for: dict[int, torch.Tensor] = field(default_factory=dict)  # profile -> row indices [r]
    valid: torch.Tensor | None = None  # [B, S] False at padding, for this forward
    first: torch.Tensor | None = None  # [B, S] True at position 0 (BOS), for this forward
    fired: dict[str, torch.Tensor] = field(default_factory=dict)  # hookpoint -> [B] bool
    profile_ids: torch.Tensor | None = None  # [B] on the CPU
    device: torch.device | str = "cpu"

    def begin(self, profile_ids: list[int], device: torch.device | str) -> None:
        self.profile_ids, self.device = torch.tensor(profile_ids, dtype=torch.long), device
        self.fired, self.valid = {}, None
        self._index()

    def end(self) -> None:
        self.rows_for, self.fired, self.valid, self.first = {}, {}, None, None

    def keep(self, rows: torch.Tensor) -> None:
        """Drops finished rows: `rows` [B'] are the row indices that stay, in their new order."""
        self.profile_ids = self.profile_ids[rows.cpu()]
        self.fired = {h: f[rows.to(f.device)] for h, f in self.fired.items()}
        self._index()

    def _index(self) -> None:
        ids = self.profile_ids
        self.rows_for = {int(p): (ids == p).nonzero().squeeze(-1).to(self.device) for p in ids.unique()}


class ResidualHook:
    def __init__(self, hookpoint: str, entries: list[HookEntry], state: BatchState):
        self.hookpoint = hookpoint
        self.entries = entries
        self.state = state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d_model] -> the residual with each row's own profile applied."""
        st = self.state
        out = None
        for e in self.entries:
            rows = st.rows_for.get(e.profile)
            if rows is None:
                continue
            valid = st.valid[rows] if st.valid is not None else None
            if e.edit.skip_bos and st.first is not None:
                valid = ~st.first[rows] if valid is None else valid & ~st.first[rows]
            fired = st.fired.get(self.hookpoint)
            y, f = apply_edits(x[rows], e.sae, e.edit, valid, fired[rows] if fired is not None else None)
            if f is not None:
                if fired is None:
                    fired = st.fired[self.hookpoint] = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                fired[rows] = f
            if y is not x:
                out = x.clone() if out is None else out
                out[rows] = y
        return x if out is None else out


def install_hf_hooks(model: torch.nn.Module, table: ProfileTable, state: BatchState) -> list:
    """Installs one ResidualHook per intervened hook point on a transformers *ForCausalLM.
    blocks.L.hook_resid_pre is layer L's input, blocks.L.hook_resid_post its output."""
    layers = model.model.layers
    handles = []
    for hp, entries in table.by_hook.items():
        layer, kind = HOOKPOINT_RE.match(hp).groups()
        hook = ResidualHook(hp, entries, state)
        module = layers[int(layer)]
        if kind == "post":
            def post(_mod, _args, output, hook=hook):
                if isinstance(output, tuple):
                    return (hook(output[0]),) + output[1:]
                return hook(output)
            handles.append(module.register_forward_hook(post))
        else:
            def pre(_mod, args, kwargs, hook=hook):
                if args:
                    return (hook(args[0]),) + args[1:], kwargs
                return args, {**kwargs, "hidden_states": hook(kwargs["hidden_states"])}
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


@contextmanager
def ablated(tl_model, profile: ProfileSpec, table: ProfileTable | None = None):
    """Applies one profile to a TransformerLens HookedTransformer for the duration of the block."""
    table = table or ProfileTable({profile.name: profile}, device=tl_model.cfg.device, dtype=tl_model.cfg.dtype)
    idx = table.index[profile.name]
    names = dict(tl_model.hook_dict)
    state = BatchState()
    try:
        for hp, entries in table.by_hook.items():
            mine = [e for e in entries if e.profile == idx]
            if not mine:
                continue
            if hp not in names:
                raise ValueError(f"hookpoint {hp!r} not found in the model")
            residual_hook = ResidualHook(hp, mine, state)

            def fn(x, hook, residual_hook=residual_hook):  # x: [B, S, d], BOS at position 0
                state.rows_for = {idx: torch.arange(x.shape[0], device=x.device)}
                state.first = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
                state.first[:, 0] = True
                return residual_hook(x)
            tl_model.add_hook(hp, fn)
        yield tl_model
    finally:
        tl_model.reset_hooks()
