"""Train a class-conditional DiT in pixel space (DiT's objective, EMA, AdamW, resumable).

Writes OUT/state.pt (training state, for --resume; keep it out of git), OUT/model.safetensors
(EMA weights in calicache's format) and OUT/train.json.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..data import load_dataset
from ..diffusion.losses import LOSS_WEIGHTINGS
from ..training.train import LR_DECAYS, TrainConfig, train
from .common import json_object, setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="registry name of the architecture")
    p.add_argument("--model-overrides", default=None, help='JSON DiT config overrides, e.g. {"depth": 4}')
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, a folder of images (one sub-folder per class) or an .npz (arr_0, arr_1)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--image-size", type=int, default=None, help="resize and center-crop folder images to this size")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=d.lr_decay,
                   help="after warm-up: constant, or cosine decay to 0 at the last of --steps")
    p.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default=d.loss_weighting,
                   help="weighting of the eps-MSE over timesteps: uniform, or min-snr (Hang et al. 2023)")
    p.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="gamma of --loss-weighting min-snr")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--init-from", default=None,
                   help="fine-tune: start from another run's state.pt (model and EMA) or a model file or "
                        "shipped name such as fmnist-dit (its weights start both); fresh optimiser")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out holding a run (replaces its state.pt, model.safetensors, train.json)")


def run(args: argparse.Namespace) -> int:
    setup(args)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    images, labels = load_dataset(args.data, "train", args.data_dir, size=args.image_size)
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every,
                      seed=args.seed, flip=not args.no_flip, warmup=args.warmup, lr_decay=args.lr_decay,
                      loss_weighting=args.loss_weighting, snr_gamma=args.snr_gamma)
    overrides = (json_object(args.model_overrides, "--model-overrides", '\'{"depth": 4}\'')
                 if args.model_overrides else {})
    if labels is None:  # unlabelled images: one class, i.e. an unconditional model
        labels = np.zeros(len(images), dtype=np.int64)
    # The data's shape decides what the user did not set explicitly.
    if images.shape[1] == images.shape[2]:
        overrides.setdefault("input_size", images.shape[1])
    overrides.setdefault("in_channels", 1 if images.ndim == 3 else images.shape[3])
    overrides.setdefault("num_classes", int(labels.max()) + 1)
    summary = train(cfg, images, labels, args.out, resume=args.resume, init_from=args.init_from,
                    model_overrides=overrides, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
