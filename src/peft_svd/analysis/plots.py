"""PNG figures of an adapter analysis (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from .spectral import LayerChange, summarize
from .summary import AdapterAnalysis

# Column order of the heatmaps: attention in the order it computes, then the MLP.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # matplotlib is an optional dependency
        raise ImportError("Plots need matplotlib: `pip install peft-svd[analysis]`.") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(layers: list[LayerChange], encoder: str, path: str | Path) -> Path:
    """Heatmap of the relative change (%) of every adapted layer of one encoder.

    Rows are blocks, columns module types in the order they appear in the model.

    Returns:
        The path written.
    """
    plt = _pyplot()
    import numpy as np

    stats = summarize([c for c in layers if c.encoder == encoder], by=("block", "module"))
    if not stats:
        raise ValueError(f"No adapted layers in encoder {encoder!r}.")
    blocks = sorted({b for b, _ in stats}, key=lambda b: -1 if b is None else b)
    seen = list(dict.fromkeys(m for _, m in stats))
    modules = [m for m in _MODULE_ORDER if m in seen] + [m for m in seen if m not in _MODULE_ORDER]
    grid = np.full((len(blocks), len(modules)), np.nan)
    for (b, m), s in stats.items():
        grid[blocks.index(b), modules.index(m)] = 100 * s["relative_change"]

    fig, ax = plt.subplots(figsize=(1.1 * len(modules) + 2.5, 0.42 * len(blocks) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(blocks)), ["-" if b is None else str(b) for b in blocks])
    ax.set_xlabel("module")
    ax.set_ylabel("block")
    ax.set_title(f"{encoder} encoder: relative change of the weights (%)")
    if grid.size <= 120:
        high = np.nanmax(grid)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 * high else "white",
                )
    fig.colorbar(image, ax=ax, label="||d|| / ||s0|| (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_spectra(layers: list[LayerChange], path: str | Path) -> Path:
    """Singular values before and after adaptation (top) and their change ``d_i`` (bottom) for
    each of the given layers, one column per layer.

    The top panel's scale is logarithmic down to 1% of the largest singular value and linear
    below, so that adapted values that crossed zero (reversed directions) stay visible.

    Returns:
        The path written.
    """
    plt = _pyplot()
    if not layers:
        raise ValueError("No layers to plot.")
    fig, axes = plt.subplots(2, len(layers), figsize=(4.4 * len(layers), 5.8), squeeze=False, sharex="col")
    for col, change in enumerate(layers):
        index = range(change.singular_values.numel())
        top, bottom = axes[0, col], axes[1, col]
        top.plot(index, change.singular_values.numpy(), label="before", lw=1.6)
        top.plot(index, change.adapted.numpy(), ".", ms=2.5, label="after", color="tab:orange")
        top.set_yscale("symlog", linthresh=max(1e-2 * float(change.singular_values.max()), 1e-12))
        top.axhline(0, color="grey", lw=0.6)
        title = f"{change.encoder} block {change.block} {change.module}"
        if change.flipped:
            title += f"\n{change.flipped} values crossed zero"
        top.set_title(title, fontsize=9)
        top.set_ylabel("singular value")
        top.legend(fontsize=8)
        bottom.bar(
            index,
            change.delta.numpy(),
            width=1.0,
            color=["tab:orange" if d >= 0 else "tab:blue" for d in change.delta],
        )
        bottom.axhline(0, color="grey", lw=0.6)
        bottom.set_xlabel("index (descending s0)")
        bottom.set_ylabel("change d")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_top_heads(analysis: AdapterAnalysis, path: str | Path, n: int = 10) -> Path:
    """Bar chart of the ``n`` most changed attention heads, each labelled with what it writes
    and which descriptions the adapter amplified and damped. When the analysis described some
    blocks, the chart shows the most changed heads of those blocks; otherwise of all blocks.

    Returns:
        The path written.
    """
    plt = _pyplot()
    heads = [h for h in analysis.heads if h.relative_change > 0]
    if not heads:
        raise ValueError("No attention head changed (no adapted q/k/v/out projection moved).")
    # With descriptions, show the heads that have them: a picture of what the moved heads do.
    described_heads = [h for h in heads if analysis.head_concepts(h) is not None]
    described = bool(described_heads)
    heads = (described_heads or heads)[:n]
    fig, ax = plt.subplots(figsize=(12 if described else 6, 0.75 * len(heads) + 1.4))
    if described:  # leave the right part of the figure to the descriptions
        fig.subplots_adjust(left=0.1, right=0.38)
    values = [100 * h.relative_change for h in heads]
    colors = ["tab:orange" if h.gain >= 0 else "tab:blue" for h in heads]
    positions = list(range(len(heads)))[::-1]
    ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, [f"{h.encoder} b{h.block} h{h.head}" for h in heads])
    ax.set_xlabel("relative change of q/k/v/out slices (%)\norange: amplified, blue: damped")
    ax.set_title(
        "Most changed heads of the described blocks" if described else "Most changed attention heads"
    )
    for pos, head in zip(positions, heads, strict=True):
        entry = analysis.head_concepts(head)
        if entry is None:
            continue
        changes = []
        if entry["amplified"]:
            changes.append(f"amplified: {_names(entry['amplified'])}")
        if entry["damped"]:
            changes.append(f"damped: {_names(entry['damped'])}")
        label = f"writes: {_names(entry['writes'])}\n" + ("; ".join(changes) or "no concept changed")
        # x in axes coordinates (right of the plot), y in data coordinates (the bar).
        ax.text(1.03, pos, label, va="center", fontsize=8, transform=ax.get_yaxis_transform())
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# Caption openings that carry no meaning in a figure label ("a photo of the letter g." -> "letter g").
_LABEL_OPENINGS = ("a photo of the ", "a photo of a ", "a photo of ", "a photo, ", "a photo in ")


def _short(text: str) -> str:
    for opening in _LABEL_OPENINGS:
        if text.startswith(opening) and len(text) > len(opening):
            text = text[len(opening) :]
            break
    return text.rstrip(".")


def _names(pairs, n: int = 2) -> str:
    return ", ".join(_short(text) for text, _ in pairs[:n])
