"""Feature discovery: rank SAE features by how specifically they fire on forget text vs retain text.

dsg:     squared mean activation on forget tokens, kept only where mean(forget) / mean(retain) >=
         min_ratio (after DSG, 2025)
firing:  firing rate on forget tokens, after dropping features that fire on more than max_retain_rate
         of retain tokens (after Farrell et al. 2024 / SAEBench)
ceiling: rate of forget tokens where the feature fires above its highest activation on any retain
         text; that activation becomes the feature's `fires_above`, so a feature that fires weakly
         on retain text and strongly on the topic (a first-name feature and "Harry") is usable.
         With `outliers` = n, the ceiling is the highest activation once the n retain texts where the
         feature peaks highest are left out: one odd token in 1,500 Wikipedia summaries (" the" in an
         article on Baghdad) no longer sets a threshold the topic's own prompts seldom reach

The retain side may be several sets (say, other fiction and Wikipedia); a feature is then judged by
the set it fires on most, so a genre feature cannot pass because a large generic set dilutes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ablation.edit import encode
from ablation.residual import Hookpoint
from ablation.spec import FeatureEdit, Intervention, ProfileMetadata, ProfileSpec
from workshop import corpus
from workshop.activations import residual_batches


@dataclass
class FeatureActs:
    """SAE activations of every non-BOS token of a text set."""

    acts: torch.Tensor  # [T, d_sae]
    token_ids: list[int]  # [T]
    doc: list[int]  # [T] index of the text each token came from
    pos: list[int]  # [T] position in that text's token row


def retain_sets(sets: list[list[str]], n_wiki: int) -> list[list[str]]:
    """The given retain sets, plus one of n_wiki Wikipedia summaries from the SAE's training split."""

    return sets + ([[t for _, t in corpus.wiki_summaries("train")[:n_wiki]]] if n_wiki else [])


def layer_of(hookpoint: str) -> int:
    hp = Hookpoint.parse(hookpoint)
    if hp.kind != "post":
        raise ValueError(f"discovery reads blocks.<L>.hook_resid_post; got hookpoint {hookpoint!r}")
    return hp.layer


def feature_acts(lm, sae, texts: list[str], layer: int, max_len: int = 128) -> FeatureActs:
    tok = lm.tokenizer
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids[:max_len - 1] for t in texts]
    acts, ids, doc, pos = [], [], [], []
    i0 = 0
    for lens, res in residual_batches(lm, rows, [layer]):
        x = res[layer]
        for j, n in enumerate(lens):
            acts.append(encode(sae, x[j, 1:n].to(sae.device)).float().cpu())
            ids += rows[i0 + j][1:n]
            doc += [i0 + j] * (n - 1)
            pos += list(range(1, n))
        i0 += len(lens)
    return FeatureActs(torch.cat(acts), ids, doc, pos)


def doc_max(fa: FeatureActs) -> torch.Tensor:
    """[texts, d_sae]: each text's highest activation of every feature (a text's tokens are contiguous)."""
    _, counts = torch.unique_consecutive(torch.tensor(fa.doc), return_counts=True)
    return torch.stack([rows.amax(0) for rows in fa.acts.split(counts.tolist())])


@dataclass(frozen=True)
class FeatureScore:
    """One feature of a ranking: its score and the statistics it was ranked by (retain: the worst set)."""
    feature: int
    score: float
    mean_forget: float
    mean_retain: float
    ratio: float
    rate_forget: float
    rate_retain: float
    max_retain: float
    mean_when_active: float  # on the forget text: what a clamp value is a multiple of
    fires_above: float | None = None  # method ceiling: the activation above which it counts as firing


def rank(forget: FeatureActs, retain: FeatureActs | list[FeatureActs], method: str = "dsg", min_ratio: float = 5.0,
         max_retain_rate: float = 0.01, top: int = 20, outliers: int = 0) -> list[FeatureScore]:
    f = forget.acts
    sets = retain if isinstance(retain, list) else [retain]
    groups = [g.acts for g in sets]
    mean_f, rate_f = f.mean(0), (f > 0).float().mean(0)
    mean_r = torch.stack([g.mean(0) for g in groups]).amax(0)  # worst retain set, per feature
    rate_r = torch.stack([(g > 0).float().mean(0) for g in groups]).amax(0)
    if outliers:
        peaks = torch.cat([doc_max(g) for g in sets])
        max_r = peaks.topk(min(outliers + 1, len(peaks)), dim=0).values[-1]
    else:
        max_r = torch.stack([g.amax(0) for g in groups]).amax(0)
    ratio = mean_f / mean_r.clamp_min(1e-6)
    if method == "dsg":
        score = torch.where(ratio >= min_ratio, mean_f ** 2, torch.zeros_like(mean_f))
    elif method == "firing":
        score = torch.where(rate_r <= max_retain_rate, rate_f, torch.zeros_like(rate_f))
    elif method == "ceiling":
        score = (f > max_r).float().mean(0)
    else:
        raise ValueError(f"unknown method {method!r}: use dsg, firing or ceiling")
    order = score.argsort(descending=True)[:top]
    active_mean = (f.sum(0) / (f > 0).sum(0).clamp_min(1))
    return [FeatureScore(int(i), float(score[i]), float(mean_f[i]), float(mean_r[i]), float(ratio[i]),
                         float(rate_f[i]), float(rate_r[i]), float(max_r[i]), float(active_mean[i]),
                         float(max_r[i]) if method == "ceiling" else None)
            for i in order if score[i] > 0]


def top_contexts(fa: FeatureActs, tok, texts: list[str], feature: int, n: int = 5, window: int = 8) -> list[dict]:
    """The n tokens where `feature` fires most, each with a little text around it."""
    col = fa.acts[:, feature]
    out = []
    for i in col.argsort(descending=True)[:n].tolist():
        if col[i] <= 0:
            break
        same = [j for j in range(max(0, i - window), min(len(col), i + 3)) if fa.doc[j] == fa.doc[i]]
        left = tok.decode([fa.token_ids[j] for j in same if j < i])
        right = tok.decode([fa.token_ids[j] for j in same if j > i])
        out.append({"act": float(col[i]), "token": tok.decode([fa.token_ids[i]]), "context": f"{left}[[{tok.decode([fa.token_ids[i]])}]]{right}"})
    return out


def clamp_profile(name: str, model: str, sae_ref: str, hookpoint: str, features: list[FeatureScore],
                  keep_error: bool, condition: str, value_scale: float, note: str,
                  fires_above: float = 0.0, generated: str = "same", markup_guard: bool = False) -> ProfileSpec:
    """A profile clamping each feature to -value_scale x its mean activation where active (0 -> ablate).
    A feature counts as active above its ranking's `fires_above` (method ceiling), else above
    fires_above x its mean activation. The notes keep each feature's ranking statistics (JSON)."""
    edits = [FeatureEdit(feature=f.feature, value=round(-value_scale * f.mean_when_active, 3),
                         fires_above=round(f.fires_above if f.fires_above is not None
                                           else fires_above * f.mean_when_active, 3)) for f in features]
    if Path(sae_ref).is_dir():  # a profile resolves a relative path from its own folder, not the cwd
        sae_ref = str(Path(sae_ref).resolve())
    stats = [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(f).items() if v is not None}
             for f in features]
    return ProfileSpec(name=name, description=note, model=model, markup_guard=markup_guard,
                       interventions=[Intervention(hookpoint=hookpoint, sae=sae_ref, keep_error=keep_error,
                                                   condition=condition, generated=generated, edits=edits)],
                       metadata=ProfileMetadata(version=1, notes=json.dumps(stats)))
