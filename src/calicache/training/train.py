"""`calicache train`: a class-conditional DiT in pixel space with DiT's objective, EMA and AdamW.

Training state (model, EMA, optimiser, RNG, step) goes to `OUT/state.pt` atomically every
`ckpt_every` steps; `resume=True` continues bit-exactly from it. The EMA weights are exported to
`OUT/model.safetensors` (calicache's own format) at every checkpoint and at the end.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.losses import LOSS_WEIGHTINGS, training_loss
from ..diffusion.schedule import Schedule
from ..images import to_model_space
from ..models.dit import DiT, create_model
from ..models.io import load_model, save_model
from ..tensorfile import read_torch
from ..utils import Outputs, check_output, write_file

LR_DECAYS = ("constant", "cosine")


@dataclass
class TrainConfig:
    model: str = "DiT-Tiny/2"
    steps: int = 10000
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ckpt_every: int = 500
    seed: int = 0
    flip: bool = True
    warmup: int = 200
    lr_decay: str = "constant"
    loss_weighting: str = "uniform"
    snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {self.snr_gamma}")
        for name in ("steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate at 0-based `step`: linear warm-up, then constant or cosine decay to 0 at `cfg.steps`."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_decay == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return lr


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at `step`: epoch permutations seeded by (seed, epoch), no state needed."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def _config_key(cfg: TrainConfig | dict) -> str:
    """The settings a resumed run must share with the stored state (all but `steps`).

    Fields added after a state was written count with their defaults, so older states still resume.
    """
    d = asdict(TrainConfig()) | (asdict(cfg) if isinstance(cfg, TrainConfig) else cfg)
    return json.dumps(d | {"steps": None}, sort_keys=True)


def _initial_weights(init_from: str | Path) -> tuple[dict, dict]:
    """(model, EMA) state dicts to fine-tune from: a training `state.pt`, or a model file or shipped
    name that `load_model` reads (its weights then start both the model and its EMA)."""
    if Path(init_from).suffix == ".pt":
        st = _read_state(init_from, "--init-from")
        return st["model"], st["ema"]
    weights = load_model(init_from).state_dict()
    return weights, weights


@torch.no_grad()
def _ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


STATE_KEYS = ("model", "ema", "opt", "rng", "step", "losses", "elapsed", "config")


def _read_state(path: str | Path, flag: str) -> dict:
    """A training state written by `calicache train` (weights-only load; anything else is refused)."""
    fix = "pass the state.pt a `calicache train` run wrote"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: no training state at {path}; {fix}")
    st = read_torch(path, fix)
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise ValueError(f"{flag} {path}: not a calicache training state (missing {missing}); {fix}")
    return st


def train(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    out: str | Path,
    resume: bool = False,
    model_overrides: dict | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train and return a summary dict (also written to OUT/train.json).

    A folder that already holds a run is continued only with `resume`, replaced only with `overwrite`."""
    out = Path(out)
    check_output(out, flag="--out", folder=True)
    if not resume:
        for name in ("state.pt", "model.safetensors", "train.json"):
            if (out / name).exists() and not overwrite:
                raise ValueError(f"--out {out} already holds a training run ({name}); pass --resume to continue it, "
                                 "--overwrite to start over (its state.pt, model.safetensors and train.json are "
                                 "replaced), or choose another --out")
            check_output(out / name, overwrite=True, inputs=[init_from] if init_from else ())
    out.mkdir(parents=True, exist_ok=True)
    data = to_model_space(images)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(data) < cfg.batch_size:
        raise ValueError(f"{len(data)} images are fewer than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **(model_overrides or {}))
    if tuple(data.shape[1:]) != (model.config.in_channels, model.config.input_size, model.config.input_size):
        raise ValueError(
            f"images are {tuple(data.shape[1:])} (C, H, W) but {cfg.model} expects "
            f"{(model.config.in_channels, model.config.input_size, model.config.input_size)}; "
            "override in_channels/input_size to match the data"
        )
    if int(y_all.max()) >= model.config.num_classes:
        raise ValueError(f"labels reach {int(y_all.max())} but the model has {model.config.num_classes} classes")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    schedule = Schedule.create(None)
    state_path = out / "state.pt"
    step, losses, elapsed = 0, [], 0.0
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no training state at {state_path}")
        st = _read_state(state_path, "--resume")
        if _config_key(json.loads(st["config"])) != _config_key(cfg):
            raise ValueError(f"{state_path} was written with other training settings; use a new --out")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        torch.set_rng_state(st["rng"])
        step, losses, elapsed = int(st["step"]), list(st["losses"]), float(st["elapsed"])
    elif init_from is not None:
        # Fine-tuning: model and EMA weights from another run, a fresh optimiser and schedule.
        weights, ema_weights = _initial_weights(init_from)
        model.load_state_dict(weights)
        ema.load_state_dict(ema_weights)
    model.train()

    def checkpoint() -> None:
        st = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
              "rng": torch.get_rng_state(), "step": step, "losses": losses, "elapsed": elapsed,
              "config": _config_key(cfg)}
        with Outputs() as outputs:  # state and exported model are replaced together
            buf = io.BytesIO()
            torch.save(st, buf)
            outputs.write(state_path, buf.getvalue())
            save_model(ema, out / "model.safetensors", outputs, train_step=step)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress)
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        idx = _batch_indices(len(data), cfg.batch_size, cfg.seed, step)
        x0, y = data[idx], y_all[idx]
        if cfg.flip:
            flip = torch.rand(len(x0)) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        t = torch.randint(0, len(schedule), (len(x0),))
        noise = torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, noise)
        loss = training_loss(model(x_t, t, y), x0, x_t, t, noise, schedule, cfg.loss_weighting,
                             cfg.snr_gamma).mean()
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, cfg.ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            checkpoint()
    bar.close()
    summary = {"config": asdict(cfg), "init_from": None if init_from is None else str(init_from),
               "model_config": model.config.to_dict(), "steps_done": step,
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "final_loss_mean100": float(np.mean(losses[-100:])), "images": len(data)}
    write_file(out / "train.json", json.dumps(summary, indent=2))
    return summary
