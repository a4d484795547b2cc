"""The built-in engine's sampling: top_p from a top-k of candidates keeps what a full sort keeps, and the
inverse-CDF draw follows the kept probabilities."""

import pytest
import torch

from server.engine.base import SamplingParams
from server.engine.sampling import TOP_P_CANDIDATES, _kept, draw

V = 262144


def reference_kept(scaled: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """min_p, top_k and top_p by definition, from one full sort of the vocabulary."""
    probs = torch.softmax(scaled, -1)
    ranked = probs.sort(descending=True).values
    floor = max(p.min_p * ranked[0], ranked[p.top_k - 1] if 0 < p.top_k < len(ranked) else 0)
    probs = probs * (probs >= floor)
    if p.top_p < 1.0:
        sp, idx = probs.sort(descending=True)
        mass_before = sp.cumsum(-1) / sp.sum() - sp / sp.sum()
        probs = torch.zeros_like(probs).scatter(0, idx, sp.masked_fill(mass_before > p.top_p, 0))
    return probs


def dense(scaled: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    probs, ids = _kept(scaled, p)
    return probs if ids is None else torch.zeros(scaled.shape[0]).scatter(0, ids, probs)


@pytest.mark.parametrize("spread", [4.0, 0.05])  # peaked: top_p within the candidates; flat: beyond them
@pytest.mark.parametrize("fields", [dict(top_p=0.9), dict(top_p=0.5, top_k=50), dict(top_p=0.95, min_p=0.01),
                                    dict(), dict(top_k=40)])
def test_kept_tokens_equal_a_full_sort(spread, fields):
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(V, generator=g) * spread
    p = SamplingParams(temperature=1.0, **fields)
    got, want = dense(scaled, p), reference_kept(scaled, p)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want)
    if "top_p" in fields and "top_k" not in fields and spread < 1:
        assert int((want > 0).sum()) > TOP_P_CANDIDATES  # the fall-back to the full sort was taken


def test_the_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20000)]), minlength=6).double() / 20000
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs.double(), atol=0.015, rtol=0)
    seeded = [draw(probs, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(seeded)) == 1  # a seed gives the same draw
