"""Train a class-conditional DiT in pixel space (DiT's objective, EMA, AdamW, resumable).

Writes OUT/state.pt (training state, for --resume; keep it out of git), OUT/model.safetensors
(EMA weights in calicache's format) and OUT/train.json.
"""

from __future__ import annotations

import argparse
import json

from ..data.fashion_mnist import load_fashion_mnist
from ..train import TrainConfig, train
from .common import setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="registry name of the architecture")
    p.add_argument("--model-overrides", default=None, help='JSON DiT config overrides, e.g. {"depth": 4}')
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    setup(args)
    if args.data != "fashion-mnist":
        raise ValueError(f"unknown --data {args.data!r}; choose fashion-mnist")
    images, labels = load_fashion_mnist("train", args.data_dir)
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every,
                      seed=args.seed, flip=not args.no_flip, warmup=args.warmup)
    overrides = json.loads(args.model_overrides) if args.model_overrides else None
    summary = train(cfg, images, labels, args.out, resume=args.resume, model_overrides=overrides)
    print(json.dumps(summary, indent=2))
    return 0
