"""The one place for the SAE edit math. Pure functions over an SAE's encode/decode.

reconstruct  (keep_error=False): x' = decode(a')           the seed's method; `sae_only` when a' = a
keep_error   (keep_error=True):  x' = x + decode(a') - decode(a)  only the edited features move x
where a = encode(x) and a' is a with the chosen features set to their values where `condition` holds
(`sequence_active`: from the sequence's first firing on, only where each feature is above 0), plus a
steering vector where the edit is on (`steer`: every valid token for `always`, where a feature fires for
`token`, from the first firing on for the sequence conditions).
Both also say where the edit *fired* (the trigger audit): where an edited feature is above its
threshold at a token that may be edited (every such token for `always` and for sae_only).

Activations come as [B, S, d] rows (each row one sequence) or as flat tokens [N, d] with `seq`
saying which sequence each token belongs to (a sequence's tokens contiguous and in order), the
layout of a packed prefill or of vLLM's batches. Only the `sequence` condition needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # deferred: the type only (sae_lens, with transformer_lens, takes 13 s to import)
    from sae_lens import SAE

from ablation.spec import Intervention


@dataclass(frozen=True)
class EditTensors:
    """An intervention turned into tensors once, before any decoding."""

    features: torch.Tensor  # [k] long
    values: torch.Tensor  # [k]
    keep_error: bool
    condition: str  # "always" | "token" | "sequence" | "sequence_active"
    skip_bos: bool = True
    thresholds: torch.Tensor | None = None  # [k]: a feature fires where its activation is above this
    generated: str = "same"  # at generated tokens: "same" | "zero" (values 0) | "off" (no edit)
    steer: torch.Tensor | None = None  # [d_model]: added where the edit is on (scale times the unit direction)

    @classmethod
    def from_intervention(cls, iv: Intervention, device: torch.device | str = "cpu",
                          direction: torch.Tensor | None = None) -> "EditTensors":
        """direction: the unit vector of iv.steer (loaded by the caller: ablation.sae_io.load_direction)."""
        return cls(
            features=torch.tensor([e.feature for e in iv.edits], dtype=torch.long, device=device),
            values=torch.tensor([e.value for e in iv.edits], dtype=torch.float32, device=device),
            keep_error=iv.keep_error,
            condition=iv.condition,
            skip_bos=iv.skip_bos,
            thresholds=torch.tensor([e.fires_above for e in iv.edits], dtype=torch.float32, device=device),
            generated=iv.generated,
            steer=None if iv.steer is None else (iv.steer.scale * direction.float()).to(device),
        )

    @property
    def stateful(self) -> bool:
        return self.condition.startswith("sequence")

    @property
    def is_noop(self) -> bool:
        return self.keep_error and self.features.numel() == 0 and self.steer is None


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    acts = sae.encode(x.to(sae.dtype))
    return acts.to_dense() if acts.is_sparse else acts


def token_sequences(shape: torch.Size, seq: torch.Tensor | None, device) -> torch.Tensor:
    """[N] sequence index per flattened token: `seq` as given, else each row of [B, S, ...] is one
    sequence, else (flat tokens) all tokens are one."""
    if seq is not None:
        return seq.reshape(-1)
    if len(shape) >= 3:
        return torch.arange(shape[0], device=device).repeat_interleave(shape[1])
    return torch.zeros(shape[0], dtype=torch.long, device=device)


def sequence_on(hit: torch.Tensor, seq: torch.Tensor, fired: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hit: [N] bool, seq: [N] long, fired: [R] bool (indexed by seq) -> (on [N]: at or after the
    first hit of its sequence or the sequence fired in an earlier forward, updated fired [R])."""
    _, counts = torch.unique_consecutive(seq, return_counts=True)
    ends = counts.cumsum(0)  # [r] one past each sequence's last token
    c = hit.long().cumsum(0)
    before = torch.cat([c.new_zeros(1), c[ends[:-1] - 1]])  # hits before each sequence starts
    on = ((c - before.repeat_interleave(counts)) > 0) | fired[seq]
    fired = fired.clone()
    fired[seq[ends - 1]] = on[ends - 1]
    return on, fired


def edit_columns(
    acts: torch.Tensor,
    edit: EditTensors,
    valid: torch.Tensor | None = None,
    fired: torch.Tensor | None = None,
    seq: torch.Tensor | None = None,
    prompt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """acts: [..., d_sae]; valid: [...] bool (False at padding and BOS); fired: [R] bool, whether an
    edited feature fired earlier in each sequence (condition "sequence", carried across decode
    steps); seq: see token_sequences; prompt: [...] bool, True at prompt tokens (None: all are).
    Returns the edited features' old and new activations ([..., k] each), the updated `fired`, where
    the edit fired and where it is on ([...] bool each)."""
    sel = acts[..., edit.features]  # [..., k]
    target = edit.values.to(acts.dtype).expand_as(sel)
    if edit.generated == "zero" and prompt is not None:  # generated tokens: set to 0, not to the values
        target = torch.where(prompt[..., None], target, torch.zeros_like(target))
    active = sel > (0 if edit.thresholds is None else edit.thresholds.to(acts.dtype))
    if edit.condition == "always":
        return sel, target, fired, everywhere(acts, valid), everywhere(acts, valid)
    hit = active.any(-1)  # [...]
    if valid is not None:
        hit = hit & valid
    if edit.condition == "token":
        return sel, torch.where(active, target, sel), fired, hit, hit
    seq = token_sequences(acts.shape, seq, acts.device)
    if fired is None:
        fired = torch.zeros(int(seq.max()) + 1, dtype=torch.bool, device=acts.device)
    on, fired = sequence_on(hit.reshape(-1), seq, fired)
    on = on.reshape(hit.shape)
    where = on[..., None]
    if edit.condition == "sequence_active":  # from the first firing on, only where the feature is active
        where = where & (sel > 0)
    return sel, torch.where(where, target, sel), fired, hit, on


def everywhere(acts: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[...] bool: every token that may be edited (an edit without a condition fires at each)."""
    return valid if valid is not None else torch.ones(acts.shape[:-1], dtype=torch.bool, device=acts.device)


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
    seq: torch.Tensor | None = None,
    prompt: torch.Tensor | None = None,
    acts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x: [..., d_model] residual ([B, S, d] rows or [N, d] tokens) -> (edited residual in x's
    dtype, updated `fired`, where the edit fired: [...] bool). valid: [...] positions that may be edited and may count as firing
    (False at padding, BOS); prompt: [...] True at prompt tokens (None: every token is one); acts:
    encode(sae, x) where the caller has it already (it may be written to)."""
    if edit.is_noop:
        return x, fired, torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    acts = encode(sae, x) if acts is None else acts
    if edit.features.numel() == 0:  # sae_only, or a steer alone (keep_error)
        hit = on = everywhere(acts, valid)
        out = x if edit.keep_error else sae.decode(acts).to(x.dtype)
    else:
        old, new, fired, hit, on = edit_columns(acts, edit, valid, fired, seq, prompt)
        if edit.keep_error:  # x + sum_f (a'_f - a_f) W_dec[f]
            out = x + ((new - old) @ decoder_rows(sae, edit.features)).to(x.dtype)
        else:
            acts[..., edit.features] = new
            out = sae.decode(acts).to(x.dtype)
    if edit.steer is not None:
        out = out + (on[..., None] * edit.steer.to(out.dtype))
    keep = valid
    if edit.generated == "off" and prompt is not None:  # generated tokens keep their residual
        keep = prompt if keep is None else keep & prompt
    return (out if keep is None else torch.where(keep[..., None], out, x)), fired, hit
