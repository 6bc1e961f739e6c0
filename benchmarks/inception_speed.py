"""Inception-v3 feature extraction speed on this CPU: the plain graph against the fast path, and bf16.

    python benchmarks/inception_speed.py --num 32 --repeats 3 --threads 1

Fashion-MNIST test images (grayscale replicated to RGB, as samples are stored) go through
`InceptionExtractor(fast=False)` (the TF graph as is), `InceptionExtractor()` (batch norm folded,
channels-last, grayscale as one channel) and the fast path under bf16 autocast; the configurations
are interleaved and repeated in one process, and each reports images/s (median over repeats), the
largest pool3 difference from the plain graph relative to its largest value, and the FID between
the first --num test and training images as each path measures it (what a feature change does to FID).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.metrics.frechet import frechet_distance, gaussian_stats
from calicache.metrics.inception import InceptionExtractor


class Bf16:
    """The fast extractor's network under CPU bf16 autocast, outputs cast back to float32."""

    def __init__(self, inner: InceptionExtractor):
        self.inner = inner
        forward = inner.net.forward

        def bf16_forward(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward(x)
            return tuple(None if t is None else t.float() for t in out)

        self.net_forward = bf16_forward
        self.plain_forward = forward

    def __call__(self, images: np.ndarray, batch_size: int = 64, desc: str = ""):
        self.inner.net.forward = self.net_forward
        try:
            return self.inner(images, batch_size=batch_size, desc=desc)
        finally:
            self.inner.net.forward = self.plain_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    test, _ = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    a = np.repeat(test[: args.num, :, :, None], 3, axis=-1)
    b = np.repeat(train[: args.num, :, :, None], 3, axis=-1)
    fast = InceptionExtractor()
    paths = {"plain graph": InceptionExtractor(fast=False), "fast path": fast, "fast path, bf16 autocast": Bf16(fast)}
    for ext in paths.values():  # warm-up: first-call costs (oneDNN kernel choice) out of the timings
        ext(a[:2], batch_size=2)
    times: dict[str, list[float]] = {k: [] for k in paths}
    pools: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, ext in paths.items():
            t0 = time.perf_counter()
            pools[name] = ext(a, batch_size=args.batch_size).pool
            times[name].append(time.perf_counter() - t0)
    ref = pools["plain graph"]
    rows = []
    for name, ext in paths.items():
        other = ext(b, batch_size=args.batch_size).pool
        fid = frechet_distance(*gaussian_stats(pools[name]), *gaussian_stats(other), method="eigh")
        rows.append({"path": name, "images_per_s": round(args.num / float(np.median(times[name])), 2),
                     "times_s": [round(t, 2) for t in times[name]],
                     "max_rel_pool_diff": float(np.abs(pools[name] - ref).max() / np.abs(ref).max()),
                     f"fid_test_vs_train_{args.num}": round(fid, 4)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["images_per_s"]
    print(json.dumps({"speedup_vs_plain": {r["path"]: round(r["images_per_s"] / base, 2) for r in rows},
                      "num": args.num, "repeats": args.repeats, "threads": args.threads}))


if __name__ == "__main__":
    main()
