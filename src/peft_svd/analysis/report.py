"""Write an adapter analysis as a Markdown report with PNG figures and a JSON of the numbers."""

from __future__ import annotations

import json
from pathlib import Path

from . import plots
from .spectral import LayerChange, summarize
from .summary import AdapterAnalysis


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _signed_pct(value: float) -> str:
    return f"{100 * value:+.2f}%"


def _direction(index: int, before: float, after: float, of_largest: float) -> str:
    """A singular direction as ``#i: s0 -> s0 + d (d / max s0)``."""
    return f"#{index}: {before:.3g} → {after:.3g} ({_signed_pct(of_largest)} of s_max)"


def _layer_direction(change: LayerChange, indices: list[int]) -> str:
    """The first of ``indices`` (from ``LayerChange.top_directions``) as ``_direction`` shows it."""
    if not indices:
        return "-"
    i = indices[0]
    return _direction(
        i, float(change.singular_values[i]), float(change.adapted[i]), float(change.relative_to_largest[i])
    )


def _texts(pairs, n: int = 3, scores: bool = True) -> str:
    if not pairs:
        return "-"
    if scores:
        return "; ".join(f"{text} ({score:+.2f})" for text, score in pairs[:n])
    return "; ".join(text for text, _ in pairs[:n])


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines + [""]


def _select_layers(analysis: AdapterAnalysis, names: list[str] | None, n: int) -> list[LayerChange]:
    """The layers whose spectra are plotted: the named ones, or the ``n`` most changed."""
    if names:
        chosen = [c for c in analysis.layers if any(c.name == k or c.name.endswith(k) for k in names)]
        if not chosen:
            available = ", ".join(c.name for c in analysis.layers[:6])
            raise ValueError(f"No adapted layer matches {names}; layer names look like: {available}, ...")
        return chosen[:6]
    changed = [c for c in analysis.layers if c.relative_change > 0]
    return sorted(changed or analysis.layers, key=lambda c: c.relative_change, reverse=True)[:n]


def write_report(
    analysis: AdapterAnalysis,
    out_dir: str | Path,
    spectra_layers: list[str] | None = None,
    num_spectra: int = 3,
    num_heads: int = 10,
    num_layers: int = 10,
) -> dict[str, Path]:
    """Write ``report.md``, ``analysis.json`` and the figures into ``out_dir``.

    Args:
        analysis: from ``analyze_adapter``.
        out_dir: folder to write into (created if missing).
        spectra_layers: names (or name suffixes) of layers whose spectra to plot; default the
            ``num_spectra`` most changed layers.
        num_spectra: layers in the spectrum figure when ``spectra_layers`` is not given.
        num_heads: heads in the heads table and figure.
        num_layers: rows of the most-changed-layers table.

    Returns:
        ``{"report": ..., "json": ..., "heatmap_<encoder>": ..., "spectra": ..., "heads": ...}``
        paths of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    encoders = list(dict.fromkeys(c.encoder for c in analysis.layers))
    for encoder in encoders:
        files[f"heatmap_{encoder}"] = plots.plot_heatmap(
            analysis.layers, encoder, out / f"heatmap_{encoder}.png"
        )
    spectra = _select_layers(analysis, spectra_layers, num_spectra)
    files["spectra"] = plots.plot_spectra(spectra, out / "spectra.png")
    moved_heads = [h for h in analysis.heads if h.relative_change > 0]
    if moved_heads:
        files["heads"] = plots.plot_top_heads(analysis, out / "heads.png", n=num_heads)

    data = analysis.to_dict()
    files["json"] = out / "analysis.json"
    files["json"].write_text(json.dumps(data, indent=1), encoding="utf-8")

    meta = analysis.meta
    md = ["# What the adapter changed", ""]
    facts = [f"{k}: `{v}`" for k, v in meta.items() if v is not None]
    if facts:
        md += ["- " + f for f in facts] + [""]
    md += ["## Summary", ""] + [f"- {line}" for line in data["summary"]] + [""]

    md += ["## Where the change is", ""]
    md += [
        "Relative change is `||d|| / ||s0||`, the size of the change of the singular values over their "
        "size, which equals the relative change of the weight matrix (`||W' - W||_F / ||W||_F`). "
        "Gain is `||s'|| / ||s0|| - 1`: positive when the weights grew.",
        "",
    ]
    rows = [
        [e["encoder"], e["layers"], f"{e['values']:,}", _pct(e["relative_change"]), _signed_pct(e["gain"])]
        for e in data["encoders"]
    ]
    md += _table(["encoder", "layers", "singular values", "relative change", "gain"], rows)
    for encoder in encoders:
        md += [f"![{encoder} encoder heatmap](heatmap_{encoder}.png)", ""]
    rows = [
        [e["encoder"], e["module"], e["layers"], _pct(e["relative_change"]), _signed_pct(e["gain"])]
        for e in data["module_types"]
    ]
    md += ["### By module type", ""] + _table(
        ["encoder", "module", "layers", "relative change", "gain"], rows
    )
    block_stats = summarize(analysis.layers, by=("encoder", "block"))
    rows = [
        [enc, blk, _pct(s["relative_change"]), _signed_pct(s["gain"])]
        for (enc, blk), s in block_stats.items()
    ]
    md += ["### By block", ""] + _table(["encoder", "block", "relative change", "gain"], rows)

    md += ["## Most changed layers", ""]
    md += [
        "A singular direction `#i` is shown as its singular value before and after, `s0_i → s0_i + d_i`, "
        "with the change as a share of the layer's largest singular value, `d_i / s_max`: the size of the "
        "change on the layer's own scale. (Relative to the direction's own value, `d_i / s0_i`, a "
        "near-zero singular value that moved a little would show thousands of percent while carrying "
        "almost nothing.) The most amplified / damped direction is the one with the largest `d_i` / `-d_i`.",
        "",
    ]
    changed = [c for c in analysis.layers if c.relative_change > 0]
    ranked = sorted(changed, key=lambda c: c.relative_change, reverse=True)[:num_layers]
    rows = []
    for c in ranked:
        up = c.top_directions(1, amplified=True)
        down = c.top_directions(1, amplified=False)
        rows.append(
            [
                f"`{c.name}`",
                _pct(c.relative_change),
                _signed_pct(c.gain),
                _layer_direction(c, up),
                _layer_direction(c, down),
            ]
        )
    md += _table(
        ["layer", "relative change", "gain", "most amplified direction", "most damped direction"], rows
    )
    md += ["![spectra before and after](spectra.png)", ""]

    if moved_heads:
        md += ["## Attention heads", ""]
        md += [
            "A head owns rows of q/k/v and columns of the output projection; each singular direction is "
            "split over the heads by the squared norms of its singular vector's slices, which makes the "
            "head's change exact: `||Delta W_h||^2 = sum_i d_i^2 share[i, h]`.",
            "",
        ]
        rows = []
        for h in moved_heads[:num_heads]:
            per = " / ".join(
                _pct(h.modules[m]) if m in h.modules else "-"
                for m in ("q_proj", "k_proj", "v_proj", "out_proj")
            )
            rows.append(
                [
                    f"{h.encoder} block {h.block} head {h.head}",
                    _pct(h.relative_change),
                    _signed_pct(h.gain),
                    per,
                ]
            )
        md += _table(["head", "relative change", "gain", "q / k / v / out"], rows)

        described = [(h, analysis.head_concepts(h)) for h in moved_heads]
        described = [(h, e) for h, e in described if e is not None][:num_heads]
        if described:
            md += [
                "### Heads of the described blocks",
                "",
                "What each head writes (its output projection slice times its value projection slice, read "
                "in the joint space), and which descriptions the adapter amplified or damped relative to "
                "the head's overall energy change (see the next section).",
                "",
            ]
            rows = [
                [
                    f"{h.encoder} block {h.block} head {h.head}",
                    _pct(h.relative_change),
                    _signed_pct(e["relative_energy_change"]),
                    _texts(e["writes"], scores=False),
                    _texts(e["amplified"]),
                    _texts(e["damped"]),
                ]
                for h, e in described
            ]
            md += _table(
                ["head", "relative change", "energy change", "writes mostly", "amplified", "damped"], rows
            )
        md += ["![top heads](heads.png)", ""]

    if analysis.concepts:
        md += ["## Concepts written by the later blocks", ""]
        md += [
            f"Directions the blocks write into the residual stream were mapped to the joint image-text space "
            f"(final layer norm's linear part, then the projection) and compared with {len(analysis.pool)} "
            "descriptions encoded by the model's pretrained text encoder. *Writes mostly*: the descriptions "
            "that receive most of the part's output energy before adaptation. *Energy change*: how much the "
            "part's output energy along all descriptions changed. *Amplified* / *damped*: the descriptions "
            "whose energy grew more / less than that overall change, with the difference in units of the "
            "average description's energy before (so scaling a whole part amplifies and damps nothing). A "
            "head's write is its output projection slice times its value projection slice. Weight-only "
            "view: inputs are taken as isotropic.",
            "",
        ]
        if analysis.pool_dropped:
            md += [
                f"{len(analysis.pool_dropped)} descriptions were left out because the tokenizer does not know "
                f"one of their words (e.g. {', '.join(repr(t) for t in analysis.pool_dropped[:5])}).",
                "",
            ]
        rows = [
            [
                e["encoder"],
                e["block"],
                e["part"],
                _signed_pct(e["relative_energy_change"]),
                _texts(e["writes"], scores=False),
                _texts(e["amplified"]),
                _texts(e["damped"]),
            ]
            for e in analysis.concepts
            if e["part"] in ("attention", "mlp")
        ]
        md += _table(
            ["encoder", "block", "pathway", "energy change", "writes mostly", "amplified", "damped"], rows
        )

    if analysis.directions:
        md += ["## Named singular directions", ""]
        md += [
            "The most amplified and damped singular directions of the described blocks' output projections "
            "and fc2, named by the descriptions nearest to the direction they write (cosine in the joint "
            "space; + and - are the two ends of the direction). For out_proj, the heads holding most of the "
            "direction's input vector are given with their share.",
            "",
        ]
        rows = []
        for d in analysis.directions:
            heads = ", ".join(f"h{h} ({100 * s:.0f}%)" for h, s in d.get("heads", [])) or "-"
            names = "; ".join(f"{t} ({c:+.2f})" for t, c in d["nearest"]) or "-"
            rows.append(
                [
                    f"{d['encoder']} b{d['block']} {d['module']} #{d['index']}",
                    d["kind"],
                    _direction(d["index"], d["before"], d["after"], d["of_largest"]).split(": ", 1)[1],
                    heads,
                    names,
                ]
            )
        md += _table(["direction", "kind", "s0 → s0 + d (d / s_max)", "heads", "nearest descriptions"], rows)

    md += [
        "## Method notes",
        "",
        "- Numbers come from the weights alone (no images): a change counts by how much it alters a matrix, "
        "not by how often the data uses it.",
        "- The layer norm before the projection is replaced by its linear part (scale by its weight, remove "
        "the mean); its division by the token's standard deviation is a positive factor that leaves cosines "
        "unchanged, but the way a written direction changes that deviation is ignored.",
        "- Descriptions are embedded with the pretrained text encoder and the pool's mean embedding is removed, "
        "so a description is matched by what distinguishes it from the others in the pool.",
        "",
    ]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(md), encoding="utf-8")
    return files
