"""Residual-stream activations of a transformers model, read with forward hooks; the forward stops
after the deepest requested layer (the unembedding is never run)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class _Stop(Exception):
    pass


@torch.inference_mode()
def residual_batches(lm, rows: list[list[int]], layers: list[int], batch: int = 16) -> Iterator[tuple[list[int], dict]]:
    """Yields (row lengths, {layer: [B, S, d] fp32 on the CPU}) for right-padded batches of token rows
    (blocks.L.hook_resid_post = the output of decoder layer L)."""
    stop_at = max(layers)
    grabbed: dict[int, torch.Tensor] = {}

    def grab(layer):
        def hook(_m, _a, out):
            grabbed[layer] = (out[0] if isinstance(out, tuple) else out).float().cpu()
            if layer == stop_at:
                raise _Stop
        return hook

    handles = [lm.model.model.layers[L].register_forward_hook(grab(L)) for L in layers]
    try:
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            lens = [len(r) for r in chunk]
            ids = torch.zeros(len(chunk), max(lens), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
            try:
                lm.model.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
            except _Stop:
                pass
            yield lens, dict(grabbed)
    finally:
        for h in handles:
            h.remove()
