"""Fidelity of FORA, ICC and the calibrated forecast against uncached sampling on the tiny random FLUX, SD3,
Wan and Qwen-Image pipelines of the tests (flow-matching Euler, guidance as each pipeline does it).

PSNR (dB) of the final latents against the uncached run with the same noise, over `--seeds` runs of
BATCH samples each, and the MACs speedup from `count_macs` at the tiny models' token counts. Random
weights: the numbers say that each method runs through each pipeline and how far it moves the result,
not how a trained model's images look.

    PYTHONPATH=src python benchmarks/families.py --steps 20 --seeds 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from calicache import FORAConfig, ForecastConfig, ICCConfig, apply_cache, count_macs  # noqa: E402
from calicache.metrics.fidelity import psnr_from_mse  # noqa: E402
from tiny_families import PASSES, PIPES, TEXT, TOKENS, run  # noqa: E402

CONFIGS = {
    "FORA p=2": FORAConfig(period=2),
    "ICC p=2 r=4": ICCConfig(period=2, rank=4),
    "forecast p=3 r=4": ForecastConfig(period=3, rank=4, units="timesteps"),
    "FORA p=3": FORAConfig(period=3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"steps {args.steps}, {args.seeds} runs x 2 samples per cell; PSNR (dB) of the final latents vs uncached; "
          "MACs speedup per pass")
    print("| family | tokens (image + text) | passes per step | " + " | ".join(CONFIGS) + " |")
    print("|---" * (3 + len(CONFIGS)) + "|")
    for kind, make in PIPES.items():
        ref = [run(make(), kind, steps=args.steps, seed=s) for s in range(args.seeds)]
        rng = float(max(r.max() - r.min() for r in ref))
        cells = []
        for config in CONFIGS.values():
            pipe = apply_cache(make(), config)
            err = sum(float(((run(pipe, kind, steps=args.steps, seed=s) - r) ** 2).mean())
                      for s, r in enumerate(ref)) / len(ref)
            speed = count_macs(pipe.transformer, config, args.steps, tokens=TOKENS[kind], text_tokens=TEXT)["speedup"]
            cells.append(f"{psnr_from_mse(err, rng):.1f} dB, {speed:.2f}x")
        print(f"| {kind} | {TOKENS[kind]} + {TEXT} | {PASSES[kind]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
