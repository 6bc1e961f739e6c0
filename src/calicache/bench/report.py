"""The bench's report: markdown tables, the winner under each MACs budget, the side-by-side image
and the files `calicache bench` writes (bench.md, bench.json, quality.png, side_by_side.png)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..images import png_bytes
from ..utils import Outputs, atomic_path
from .plot import quality_figure
from .runs import Result

COLUMNS = [("name", "configuration", ""), ("steps", "steps", "d"), ("mmacs", "MMACs/sample", ",.1f"),
           ("macs_speedup", "MACs speed-up", ".2f"), ("cached_ratio", "cached", ".0%"),
           ("wall_seconds", "wall s", ".2f"), ("wall_speedup", "wall speed-up", ".2f"),
           ("peak_rss_mb", "peak RSS +MB", ".1f"), ("cache_bytes", "cache bytes", ",d"),
           ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"),
           ("class_agreement", "class agr.", ".1%"), ("fd", "FD (classifier)", ".2f"), ("fid", "FID", ".2f")]
WINNER_COLUMNS = [("level", "MACs level", ""), ("mmacs", "MMACs/sample", ",.1f"), ("candidates", "configs", "d"),
                  ("by_psnr", "best PSNR", ""), ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"),
                  ("by_fd", "best FD", ""), ("fd", "FD", ".2f")]
CONVENTIONS = (
    "MACs per sample follow the papers' convention (linear layers, attention matmuls, adaLN, embeddings; "
    "no guidance doubling): calicache counts its own (`count_macs`), the peers are measured with torch's "
    "flop counter on the diffusers model, which also counts diffusers' per-block copies of the "
    "timestep/label embedders. `cached` is the share of (call, branch) pairs not computed. Peak RSS is the "
    "growth of the process's resident set during the run (sampled every 5 ms; a lower bound). PSNR/SSIM "
    "are against the uncached samples of the same seeds; FD is the Frechet distance of the Fashion-MNIST "
    "classifier's features to the test set.")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("n/a" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def side_by_side(results: list[Result], columns: int = 8, scale: int = 3) -> Image.Image:
    """A grid: one row per result (labelled), the same sample indices in every column."""
    h, w = results[0].images.shape[1:3]
    label_w = 190
    canvas = Image.new("RGB", (label_w + columns * w * scale, len(results) * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(results):
        y = i * h * scale
        draw.text((4, y + h * scale // 2 - 6), r.variant.name[:30], fill="black")
        for j, img in enumerate(r.images[:columns]):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * w * scale, y))
    return canvas


def winners(rows: list[dict], levels: list[tuple[str, int]]) -> list[dict]:
    """For each MACs budget, the configuration with the best PSNR to the uncached run, and with the
    lowest in-domain FD, among those that cost at most the budget (the reference itself excluded)."""
    out = []
    for label, budget in levels:
        fits = [r for r in rows if r["family"] != "uncached" and r["macs_per_sample"] <= budget]
        entry: dict = {"level": label, "macs": budget, "candidates": len(fits)}
        psnr = [r for r in fits if r.get("psnr") is not None and not math.isnan(r["psnr"])]  # inf: identical
        if psnr:
            best = max(psnr, key=lambda r: r["psnr"])
            entry.update(by_psnr=best["name"], psnr=best["psnr"], ssim=best.get("ssim"))
        fd = [r for r in fits if r.get("fd") is not None]
        if fd:
            best = min(fd, key=lambda r: r["fd"])
            entry.update(by_fd=best["name"], fd=best["fd"])
        out.append(entry)
    return out


def pick_level(results: list[Result], level: int) -> list[Result]:
    """The reference, then per family the result whose MACs are closest to `level` (within 25%)."""
    chosen: dict[str, Result] = {}
    for r in results[1:]:
        gap = abs(r.macs["total"] - level) / level
        old = chosen.get(r.variant.family)
        if gap <= 0.25 and (old is None or gap < abs(old.macs["total"] - level) / level):
            chosen[r.variant.family] = r
    return [results[0], *chosen.values()]


def jsonable(v):
    """`v` with non-finite floats as strings ("inf": PSNR of the reference against itself)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


def mmacs(rows: list[dict]) -> list[dict]:
    """Rows with MACs in millions for the tables (the JSON keeps exact integers)."""
    return [{**r, "mmacs": r.get("macs_per_sample", r.get("macs")) / 1e6} for r in rows]


def fd_range_note(fd_range: dict) -> str:
    return (f"FD of {fd_range['num']} real test images to the test set ({fd_range['draws']} random subsets): "
            f"{fd_range['low']:.2f}..{fd_range['high']:.2f} (5th..95th percentile), mean {fd_range['mean']:.2f}; "
            "FD differences inside that spread are sampling noise at this sample size.")


def markdown(report: dict, side_level: str) -> str:
    """bench.md from the report dict that bench.json holds."""
    rows, notes = report["rows"], list(report["notes"])
    if report.get("fd_range"):
        notes.append(fd_range_note(report["fd_range"]))
    families = list(dict.fromkeys(r["family"] for r in rows))
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in mmacs(rows))]  # no all-n/a columns
    parts = [f"# calicache bench\n\n```\n{report['command']}\n```\n\n{report['settings']}\n", CONVENTIONS + "\n"]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    for fam in families:
        fam_rows = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["macs_per_sample"])
        parts.append(f"## {fam}\n\n{markdown_table(mmacs(fam_rows), columns)}\n")
    parts.append("## Winner per MACs level\n\nAmong the configurations costing at most the MACs of uncached sampling "
                 f"with that many steps.\n\n{markdown_table(mmacs(report['winners']), WINNER_COLUMNS)}\n")
    plot = "![quality vs MACs](quality.png)\n\n" if report.get("plot", True) else ""
    parts.append(f"{plot}Side by side at {side_level}:\n\n![side by side](side_by_side.png)\n")
    return "\n".join(parts)


def write_report(out: Path, command: str, settings: str, notes: list[str], results: list[Result],
                 steps: int, num: int, seconds: dict[str, float], fd_range: dict | None = None) -> dict:
    """Write bench.md, bench.json, quality.png and side_by_side.png under `out` as one set (renamed into
    place together; a failure leaves the previous set); returns the report (bench.json's content). The
    first result is the uncached reference at `steps` steps."""
    rows = [r.row() for r in results]
    ref_macs = rows[0]["macs_per_sample"]
    levels = [(f"{r['steps']} steps", r["macs_per_sample"]) for r in rows if r["family"] == "fewer steps"]
    wins = winners(rows, levels + [(f"{steps} steps (all)", ref_macs)])
    side_macs = levels[len(levels) // 2][1] if levels else ref_macs // 2
    picked = pick_level(results, side_macs)
    plot = importlib.util.find_spec("matplotlib") is not None
    if not plot:
        notes.append("quality.png not drawn: matplotlib is not installed (pip install 'calicache[plot]')")
    report = {"command": command, "settings": settings, "notes": notes, "rows": rows, "winners": wins,
              "fd_range": fd_range, "plot": plot, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "side_by_side": [r.variant.name for r in picked]}
    side_level = f"about {side_macs / 1e6:,.1f} MMACs per sample (the reference first, then each family's closest)"
    with Outputs() as outputs:
        outputs.write(out / "side_by_side.png", png_bytes(side_by_side(picked)))
        if plot:
            quality_figure(rows, num, outputs.temp(out / "quality.png"), fd_range)
        outputs.write(out / "bench.md", markdown(report, side_level))
        outputs.write(out / "bench.json", json.dumps(jsonable(report), indent=2))
    return report


def replot(out: Path) -> Path:
    """Redraw `out`/quality.png from `out`/bench.json (a previous run's numbers); returns its path."""
    source = out / "bench.json"
    try:
        report = json.loads(source.read_text())
        rows = report["rows"]
        num = rows[0]["num"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{source}: not a readable `calicache bench` report ({e}); run `calicache bench --out "
                         f"{out}` first") from e
    with atomic_path(out / "quality.png") as tmp:
        quality_figure(rows, num, tmp, report.get("fd_range"))
    return out / "quality.png"
