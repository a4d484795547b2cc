"""`obliviate sae …` and `obliviate features …`."""

from __future__ import annotations


def add_sae(sub) -> None:
    pass


def add_features(sub) -> None:
    pass
