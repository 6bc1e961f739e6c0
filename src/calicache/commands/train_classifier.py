"""Train the in-domain Fashion-MNIST classifier (small CNN) used for class accuracy and features.

Trains on the 60k training images, measures accuracy on the 10k test images and writes one
safetensors file with the weights, the config and the run's numbers (test accuracy, epochs,
seed, wall time) as metadata.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..data import load_dataset
from ..training.classifier import accuracy, save_classifier, train_classifier
from ..utils import check_output
from .common import setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="images per Adam step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation, shuffling and flips")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (none: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")


def run(args: argparse.Namespace) -> int:
    setup(args)
    check_output(args.out, args.overwrite, "--out")  # before the training, not after it
    images, labels = load_dataset("fashion-mnist", "train", args.data_dir)
    test_images, test_labels = load_dataset("fashion-mnist", "test", args.data_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        images, labels = images[: args.limit], labels[: args.limit]
    t0 = time.perf_counter()
    model = train_classifier(images, labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, progress=not args.json)
    wall = round(time.perf_counter() - t0, 1)
    summary = {
        "test_accuracy": round(accuracy(model, test_images, test_labels), 4),
        "train_accuracy": round(accuracy(model, images, labels), 4),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "train_images": len(images), "wall_seconds": wall, "threads": torch.get_num_threads(),
    }
    save_classifier(model, args.out, **summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    return 0
