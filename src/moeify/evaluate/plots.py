"""Matplotlib figures (Agg backend: no display needed), saved as PNG."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def expert_share_heatmaps(shares: dict[str, list[list[float]]], title: str, path: Path) -> Path:
    """One heatmap per domain: layers (rows) x experts (columns), colour = share of assignments."""
    domains = list(shares)
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains) + 1, 3.8), squeeze=False, layout="constrained")
    vmax = max(max(max(row) for row in share) for share in shares.values())
    for ax, domain in zip(axes[0], domains):
        image = ax.imshow(shares[domain], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=domain, xlabel="expert", ylabel="layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of assignments")
    fig.suptitle(title)
    return _save(fig, path)


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.ticklabel_format(axis="y", useOffset=False)  # values as they are, not "1e-7 + 2.0746"
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def bar_chart(values: dict[str, float], title: str, ylabel: str, path: Path, log: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(values) + 1), 3.8))
    ax.bar(range(len(values)), list(values.values()), color="tab:blue")
    ax.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
