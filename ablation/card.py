"""SAE card numbers: sparsity and reconstruction on activations, and next-token cross-entropy on
held-out text with the layer clean, replaced by the SAE's reconstruction, or zero-ablated."""

from __future__ import annotations

import torch

from ablation.edit import EditTensors, apply_edits, encode


@torch.inference_mode()
def activation_stats(sae, acts: torch.Tensor, batch: int = 8192) -> dict:
    """acts: [N, d_model] raw residuals -> L0, explained variance, dead fraction."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    l0, sse = 0.0, 0.0
    for i in range(0, acts.shape[0], batch):
        x = acts[i:i + batch].to(sae.dtype)
        a = encode(sae, x)
        fired |= (a > 0).any(0).cpu()
        l0 += (a > 0).sum().item()
        sse += (sae.decode(a) - x).pow(2).sum().item()
    sst = (acts - acts.mean(0)).pow(2).sum().item()
    return {"l0": l0 / acts.shape[0], "explained_variance": 1 - sse / sst,
            "dead_fraction": 1 - fired.float().mean().item(), "eval_tokens": acts.shape[0]}


def _splice(lm, layer: int, fn):
    """fn(x [B, S, d]) -> x' applied to layer `layer`'s output (position 0, BOS, left alone)."""
    def hook(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        y = torch.cat([x[:, :1], fn(x[:, 1:])], dim=1)
        return (y,) + out[1:] if isinstance(out, tuple) else y
    return lm.model.model.layers[layer].register_forward_hook(hook)


@torch.inference_mode()
def cross_entropy(lm, token_rows: list[list[int]], layer: int | None = None, fn=None, batch: int = 8) -> float:
    """Mean next-token CE over rows (each BOS + text), optionally with `fn` spliced in at `layer`."""
    handle = _splice(lm, layer, fn) if fn is not None else None
    total, count = 0.0, 0
    try:
        for i in range(0, len(token_rows), batch):
            rows = token_rows[i:i + batch]
            S = max(map(len, rows))
            ids = torch.zeros(len(rows), S, dtype=torch.long)
            mask = torch.zeros(len(rows), S, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            m = mask[:, 1:].bool()
            total += nll[m].sum().item()
            count += m.sum().item()
    finally:
        if handle:
            handle.remove()
    return total / count


def ce_numbers(lm, sae, layer: int, token_rows: list[list[int]]) -> dict:
    recon = EditTensors(torch.empty(0, dtype=torch.long), torch.empty(0), keep_error=False, condition="always")
    clean = cross_entropy(lm, token_rows)
    spliced = cross_entropy(lm, token_rows, layer, lambda x: apply_edits(x, sae, recon)[0])
    zero = cross_entropy(lm, token_rows, layer, torch.zeros_like)
    return {"ce_clean": clean, "ce_with_sae": spliced, "ce_zero_ablation": zero,
            "ce_loss_recovered": (zero - spliced) / (zero - clean), "ce_eval_tokens": sum(map(len, token_rows))}
