"""PNG charts for the reports (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    # deferred: keeps matplotlib off `obliviate serve`'s start-up (the command line imports the eval commands)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str = "") -> None:
    """One cluster of bars per group, one bar per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v or 0 for v in values], width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hbars(path: Path, title: str, labels: list[str], values: list[float]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * len(labels))))
    ax.barh(range(len(labels))[::-1], values)
    ax.set_yticks(range(len(labels))[::-1], labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("mean probability drop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
