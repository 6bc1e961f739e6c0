"""Line charts drawn with PIL (no plotting dependency): one line per series, points joined in x order."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

# Distinguishable on white (Tableau 10 and a few more).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#000000",
           "#3182bd", "#e6550d", "#31a354", "#756bb1")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got {lo}..{hi}")
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.6g}"  # enough digits to tell neighbouring ticks apart, float noise dropped


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               size: tuple[int, int] = (720, 520), colours: dict[str, str] | None = None) -> Image.Image:
    """A chart with one coloured line per series and a legend below the axes.

    Non-finite points are left out; a series with one point is drawn as a marker. `colours` fixes a
    series' colour (so several charts agree); others take the palette in order.
    """
    clean = {k: sorted((x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)) for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    legend_rows = math.ceil(len(clean) / 2)
    w, h = size
    left, right, top, bottom = 70, 20, 36, 50 + 16 * legend_rows
    img = Image.new("RGB", (w, h + 16 * legend_rows), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 10), title, fill="black")
    if not clean:
        draw.text((left, top + 20), "no data", fill="black")
        return img
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = w - left - right, h + 16 * legend_rows - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + ph - (y - y0) / (y1 - y0) * ph

    for v in xt:
        px, _ = at(v, y0)
        draw.line([(px, top), (px, top + ph)], fill="#e6e6e6")
        draw.text((px - 12, top + ph + 4), _fmt(v), fill="black")
    for v in yt:
        _, py = at(x0, v)
        draw.line([(left, py), (left + pw, py)], fill="#e6e6e6")
        draw.text((4, py - 6), _fmt(v), fill="black")
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((left + pw // 2 - 4 * len(x_label) // 2, top + ph + 20), x_label, fill="black")
    if y_label not in title:
        draw.text((left, top - 14), y_label, fill="black")
    for i, (name, pts) in enumerate(clean.items()):
        colour = (colours or {}).get(name, PALETTE[i % len(PALETTE)])
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        lx, ly = left + (i % 2) * (pw // 2), top + ph + 38 + (i // 2) * 16
        draw.line([(lx, ly + 6), (lx + 18, ly + 6)], fill=colour, width=3)
        draw.text((lx + 24, ly), name[:48], fill="black")
    return img


def side_by_side_charts(charts: list[Image.Image]) -> Image.Image:
    """Charts next to each other on one white canvas."""
    out = Image.new("RGB", (sum(c.width for c in charts), max(c.height for c in charts)), "white")
    x = 0
    for c in charts:
        out.paste(c, (x, 0))
        x += c.width
    return out
