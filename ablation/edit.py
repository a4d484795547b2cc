"""The one place for the SAE edit math. Pure functions over an SAE's encode/decode.

reconstruct  (keep_error=False): x' = decode(a')           the seed's method; `sae_only` when a' = a
keep_error   (keep_error=True):  x' = x + decode(a') - decode(a)  only the edited features move x
where a = encode(x) and a' is a with the chosen features set to their values where `condition` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE

from ablation.profiles import Intervention


@dataclass(frozen=True)
class EditTensors:
    """An intervention turned into tensors once, before any decoding."""

    features: torch.Tensor  # [k] long
    values: torch.Tensor  # [k]
    keep_error: bool
    condition: str  # "always" | "token" | "sequence"
    skip_bos: bool = True
    thresholds: torch.Tensor | None = None  # [k]: a feature fires where its activation is above this

    @classmethod
    def from_intervention(cls, iv: Intervention, device: torch.device | str = "cpu") -> "EditTensors":
        return cls(
            features=torch.tensor([e.feature for e in iv.edits], dtype=torch.long, device=device),
            values=torch.tensor([e.value for e in iv.edits], dtype=torch.float32, device=device),
            keep_error=iv.keep_error,
            condition=iv.condition,
            skip_bos=iv.skip_bos,
            thresholds=torch.tensor([e.fires_above for e in iv.edits], dtype=torch.float32, device=device),
        )

    @property
    def is_noop(self) -> bool:
        return self.keep_error and self.features.numel() == 0


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    acts = sae.encode(x.to(sae.dtype))
    return acts.to_dense() if acts.is_sparse else acts


def edit_columns(
    acts: torch.Tensor,
    edit: EditTensors,
    valid: torch.Tensor | None = None,
    fired: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """acts: [B, S, d_sae]; valid: [B, S] bool (False at padding); fired: [B] bool, whether an
    edited feature fired earlier in the sequence (condition "sequence", carried across decode steps).
    Returns the edited features' old and new activations ([B, S, k] each) and the updated `fired`."""
    sel = acts[..., edit.features]  # [B, S, k]
    target = edit.values.to(acts.dtype).expand_as(sel)
    active = sel > (0 if edit.thresholds is None else edit.thresholds.to(acts.dtype))
    if edit.condition == "always":
        return sel, target, fired
    if edit.condition == "token":
        return sel, torch.where(active, target, sel), fired
    hit = active.any(-1)  # [B, S]
    if valid is not None:
        hit = hit & valid
    if fired is None:
        fired = torch.zeros(acts.shape[0], dtype=torch.bool, device=acts.device)
    on = (hit.cumsum(-1) > 0) | fired[:, None]  # [B, S]
    return sel, torch.where(on[..., None], target, sel), on[:, -1]


def decoder_rows(sae: SAE, features: torch.Tensor) -> torch.Tensor:
    """[k, d_model]: what one unit of each feature adds to the reconstruction (decoders are
    linear in the activations: acts @ W_dec + b_dec, TopK optionally rescaling by decoder norm)."""
    rows = sae.W_dec[features]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rows = rows / sae.W_dec[features].norm(dim=-1, keepdim=True)
    return rows


def apply_edits(
    x: torch.Tensor,
    sae: SAE,
    edit: EditTensors,
    valid: torch.Tensor | None = None,
    fired: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [B, S, d_model] residual -> (edited residual in x's dtype, updated `fired`).
    valid: [B, S] positions that may be edited and may count as firing (False at padding, BOS)."""
    if edit.is_noop:
        return x, fired
    acts = encode(sae, x)
    if edit.features.numel() == 0:  # sae_only
        out = sae.decode(acts).to(x.dtype)
    else:
        old, new, fired = edit_columns(acts, edit, valid, fired)
        if edit.keep_error:  # x + sum_f (a'_f - a_f) W_dec[f]
            out = x + ((new - old) @ decoder_rows(sae, edit.features)).to(x.dtype)
        else:
            acts[..., edit.features] = new
            out = sae.decode(acts).to(x.dtype)
    return (out if valid is None else torch.where(valid[..., None], out, x)), fired
