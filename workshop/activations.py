"""Residual-stream activations of a transformers model; the forward stops after the deepest
requested layer (the unembedding is never run)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from ablation.residual import Hookpoint, pad_right, residual_hooks


class _Stop(Exception):
    pass


@torch.inference_mode()
def residual_batches(lm, rows: list[list[int]], layers: list[int], batch: int = 16,
                     desc: str = "activations") -> Iterator[tuple[list[int], dict]]:
    """Yields (row lengths, {layer: [B, S, d] fp32 on the CPU}) for right-padded batches of token rows
    (blocks.L.hook_resid_post = the output of decoder layer L), with a progress bar (rows, ETA)."""

    grabbed: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def fn(x, _kwargs):
            grabbed[layer] = x.float().cpu()
            if layer == max(layers):
                raise _Stop
            return x
        return fn

    bar = tqdm(total=len(rows), desc=desc, unit="text", leave=False)
    with bar, residual_hooks(lm.model, {Hookpoint(L, "post"): grab(L) for L in layers}):
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            bar.update(len(chunk))
            ids, mask = pad_right(chunk)
            try:
                lm.model.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
            except _Stop:
                pass
            yield [len(r) for r in chunk], dict(grabbed)
