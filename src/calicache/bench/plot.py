"""The bench's quality plot with matplotlib (`pip install 'calicache[plot]'`): quality against MACs
per sample, one series per family, each with its own colour and marker in every panel and the legend.

Panels: PSNR and SSIM to the uncached samples of the same seeds (paired, image i against image i,
so differences between configurations hold at small sample sizes). The in-domain FD panel is drawn
only with the FD that real test images get at the same sample size (a band): without it a reader
cannot tell a difference from estimator noise (FD at 32 samples of 128-d features is mostly bias).
"""

from __future__ import annotations

import math
from pathlib import Path

# tab20's dark shades, then its light ones: neighbouring series differ in hue first.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8", "+", "x", "1", "2", "3")
REFERENCE_STYLE = dict(color="black", linestyle=":", linewidth=1.2)


def series_styles(names: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per series name in order; unique for up to 20 series, then they repeat."""
    return {name: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def quality_figure(rows: list[dict], num: int, path: str | Path | None = None, fd_range: dict | None = None):
    """quality.png: PSNR (dB) and SSIM to the uncached run against GMACs per sample, plus classifier FD
    with the real-data band of `fd_range` (see `metrics.frechet.subset_frechet_range`) when given.

    `rows` are bench.json rows; the reference (PSNR +inf, the uncached run itself) is the dotted line.
    Returns the matplotlib Figure (written to `path` if given).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise RuntimeError("the quality plot needs matplotlib: pip install 'calicache[plot]'") from e
    reference = [r for r in rows if r.get("psnr") == math.inf or r.get("psnr") == "inf"]
    compared = [r for r in rows if r not in reference]
    panels = [("psnr", "PSNR to uncached (dB)"), ("ssim", "SSIM to uncached (1 = identical)")]
    if fd_range is not None and any(_finite(r.get("fd")) for r in compared):
        panels.append(("fd", "FD of classifier features to test set"))
    families = [f for f in dict.fromkeys(r["family"] for r in compared)
                if any(_finite(r.get(key)) for r in compared if r["family"] == f for key, _ in panels)]
    styles = series_styles(families)
    fig = Figure(figsize=(5.2 * len(panels) + 3.6, 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for family in families:
            pts = sorted((r["macs_per_sample"] / 1e9, float(r[key])) for r in compared
                         if r["family"] == family and _finite(r.get(key)))
            if pts:
                colour, marker = styles[family]
                ax.plot(*zip(*pts), color=colour, marker=marker, markersize=7, linewidth=1.4, label=family)
        if reference:
            ax.axvline(reference[0]["macs_per_sample"] / 1e9, **REFERENCE_STYLE)
        if key == "fd":
            ax.axhspan(fd_range["low"], fd_range["high"], color="0.85", zorder=0)
        ax.set_xlabel("MACs per sample (GMACs)")
        ax.set_ylabel(label)
        ax.grid(True, color="0.9")
    handles = [Line2D([], [], color=c, marker=m, markersize=7, linewidth=1.4, label=f) for f, (c, m) in styles.items()]
    if reference:
        handles.append(Line2D([], [], label=f"{reference[0]['name']} (the reference)", **REFERENCE_STYLE))
    if len(panels) == 3:
        handles.append(Patch(color="0.85", label=f"real test images, n = {fd_range['num']} (5th-95th pct.)"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(f"Quality vs MACs, {num} samples per configuration (same seeds and classes)")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
