"""The rank-space B pass in its two forms, x B^T and (B x^T)^T, each followed by the A matmul into the
output, at the shapes of the shipped model's and DiT-XL/2's calibrated linears.

    python benchmarks/matmul_orientation.py --threads 1,2

Shapes (M rows, C_in, R, C_out): the shipped model's demo batch (40 samples with guidance, 49 tokens:
M = 3920; width 192, rank 21, q/k/v stacked to 63) and DiT-XL/2 with one image (M = 256; width 1152,
rank 128, q/k/v stacked to 384). Both forms alternate within each of `--repeats` rounds; per shape,
the median time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {
    "shipped qkv": (3920, 192, 63, 576), "shipped proj": (3920, 192, 21, 192),
    "shipped fc1": (3920, 192, 21, 768), "shipped fc2": (3920, 768, 21, 192),
    "XL qkv": (256, 1152, 384, 3456), "XL proj": (256, 1152, 128, 1152),
    "XL fc1": (256, 1152, 128, 4608), "XL fc2": (256, 4608, 128, 1152),
}


def rows_wide(x: torch.Tensor, b: torch.Tensor, a_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.addmm_(x @ b.t(), a_t)


def rank_wide(x: torch.Tensor, b: torch.Tensor, a_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.addmm_((b @ x.t()).t(), a_t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = {k: tuple(torch.randn(*s, generator=g) for s in ((m, c), (r, c), (r, o), (m, o)))
            for k, (m, c, r, o) in SHAPES.items()}
    print("| threads | shape (M, C_in, R, C_out) | x B^T, then A (ms) | (B x^T)^T, then A (ms) | ratio |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for k, tensors in data.items():
                for name, fn in (("x", rows_wide), ("b", rank_wide)):
                    t0 = time.perf_counter()
                    fn(*tensors)
                    times.setdefault((k, name), []).append(time.perf_counter() - t0)
        for k, shape in SHAPES.items():
            a, b = (statistics.median(times[(k, n)]) * 1e3 for n in ("x", "b"))
            print(f"| {threads} | {k} {shape} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
