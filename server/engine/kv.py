"""The built-in engine's KV cache and the attention over it.

`SlotCache` holds, per layer, K and V of shape [slots, kv_heads, capacity, head_dim]: running row r
owns slot r and writes position p at [r, :, p]. A forward hands a `KVStep` to the model as the
keyword argument `kv`; transformers passes it down to the attention function registered here as
ATTENTION, which writes the step's keys and values and attends: a prefill row by row (causal,
windowed on sliding layers: no work across rows), a decode step for all rows at once. Called
without `kv` it is transformers' own SDPA attention, so other users of the model see no change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "obliviate_slots"


class SlotCache:
    def __init__(self, config, slots: int, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.slots, self.dtype, self.device = slots, dtype, device
        self.n_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity = 0
        self.reserve(capacity)

    def reserve(self, length: int) -> None:
        """Grows every layer's buffers (doubling) until positions [0, length) fit."""
        if length <= self.capacity:
            return
        cap = max(self.capacity, 64)
        while cap < length:
            cap *= 2
        shape = (self.slots, self.kv_heads, cap, self.head_dim)
        for buf in (self.k, self.v):
            for i in range(self.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(buf):
                    new[:, :, :self.capacity] = buf[i]
                    buf[i] = new
                else:
                    buf.append(new)
        self.capacity = cap

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies slot src's first `length` positions into slot dst (a finished row's place)."""
        for buf in (self.k, self.v):
            for t in buf:
                t[dst, :, :length] = t[src, :, :length]


@dataclass(frozen=True)
class KVStep:
    """One forward's use of the cache.
    prefill: rows packed into one sequence [1, T]; row i is tokens bounds[i]:bounds[i+1] written to
             slot slots[i] from position 0.
    decode:  [B, 1]; row b (slot rows[b], or b) writes position pos[b] and attends to [0, pos[b]]."""

    cache: SlotCache
    bounds: list[int] | None = None
    slots: list[int] | None = None
    pos: torch.Tensor | None = None  # [B] long, on the cache's device
    rows: torch.Tensor | None = None  # [B] slots of a decode over a subset of rows; None = slots 0..B-1
    masks: dict[int | None, torch.Tensor] | None = None  # window -> [B, 1, 1, L] bool, decode only

    @classmethod
    def prefill(cls, cache: SlotCache, slots: list[int], lengths: list[int]) -> "KVStep":
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        return cls(cache, bounds=bounds, slots=slots)

    @classmethod
    def decode(cls, cache: SlotCache, pos: torch.Tensor, windows: set[int | None],
               rows: torch.Tensor | None = None) -> "KVStep":
        """pos: [B] the position each row writes; windows: the sliding windows in the model (None = full)."""
        pos = pos.to(cache.device)
        # keys [0, L) with L rounded up to a multiple of 64 (masked beyond each row's position): a few
        # attention shapes instead of one per length, as GPU attention kernels plan per shape
        length = min(-(-(int(pos.max()) + 1) // 64) * 64, cache.capacity)
        j = torch.arange(length, device=cache.device)
        seen = j[None, :] <= pos[:, None]  # [B, L]
        masks = {w: (seen if w is None else seen & (j[None, :] > pos[:, None] - w))[:, None, None, :]
                 for w in windows}
        return cls(cache, pos=pos, rows=None if rows is None else rows.to(cache.device), masks=masks)


def _causal(n: int, window: int | None, device) -> torch.Tensor | None:
    """[n, n] bool mask for a window shorter than the row; None where plain causal attention serves."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv: KVStep | None = None,
                   **kwargs):
    """query: [B, H, S, D], key/value: [B, H_kv, S, D] -> ([B, S, H, D], None)."""
    if kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    K, V = kv.cache.k[module.layer_idx], kv.cache.v[module.layer_idx]
    window = getattr(module, "sliding_window", None)
    gqa = query.shape[1] != key.shape[1]
    if kv.bounds is not None:  # prefill, B = 1
        out = torch.empty_like(query)
        for i, slot in enumerate(kv.slots):
            a, b = kv.bounds[i], kv.bounds[i + 1]
            K[slot, :, :b - a] = key[0, :, a:b]
            V[slot, :, :b - a] = value[0, :, a:b]
            mask = _causal(b - a, window, query.device)
            out[:, :, a:b] = F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=mask, is_causal=mask is None,
                scale=scaling, enable_gqa=gqa)
    else:  # decode, S = 1
        B = query.shape[0]
        rows = kv.rows if kv.rows is not None else torch.arange(B, device=query.device)
        K[rows, :, kv.pos] = key[:, :, 0]
        V[rows, :, kv.pos] = value[:, :, 0]
        mask = kv.masks[window]
        L = mask.shape[-1]
        keys, values = (K[:B, :, :L], V[:B, :, :L]) if kv.rows is None else (K[kv.rows, :, :L], V[kv.rows, :, :L])
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, slot_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
