"""An in-domain Fashion-MNIST classifier: class accuracy and features of generated samples.

A small CNN (two conv blocks + a hidden linear layer) trained on Fashion-MNIST; it plays the role
Inception-v3 plays for ImageNet in the ADM evaluation suite: `model(x)` gives logits for a
class-accuracy score, `model.features(x)` the penultimate activations for Frechet distances.
Inputs are float (N, 1, 28, 28) in [-1, 1], i.e. uint8 / 127.5 - 1, the DiT's pixel space.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics.domain import IMAGE_SIZE, classifier_input, classifier_pass
from ..models.io import shipped_file
from ..tensorfile import decode_metadata, load_tensors, read_header, save_tensors

FORMAT = "calicache-classifier"
FIX = "re-create it with `calicache train-classifier`"
SHIPPED_FILE = "fmnist-classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, int] = (16, 32)
    hidden: int = 128
    num_classes: int = 10
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if len(self.widths) != 2 or min(self.widths) < 1 or self.hidden < 1 or self.num_classes < 2:
            raise ValueError(f"invalid classifier config {self}: two positive widths, hidden >= 1, >= 2 classes")


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU, then 2x2 max-pool (halves the side)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionClassifier(nn.Module):
    """(N, 1, 28, 28) in [-1, 1] -> logits (N, num_classes); `features` -> (N, hidden)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        w1, w2 = self.config.widths
        self.block1 = _conv_block(1, w1)  # (N, w1, 14, 14)
        self.block2 = _conv_block(w1, w2)  # (N, w2, 7, 7)
        self.hidden = nn.Linear(w2 * (IMAGE_SIZE // 4) ** 2, self.config.hidden)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.hidden, self.config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after the hidden layer's ReLU), (N, hidden)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"expected images (N, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}; "
                "use classifier_input() for uint8 arrays"
            )
        h = self.block2(self.block1(x))
        return torch.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def predict_uint8(model: FashionClassifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted labels int64 (N,) for uint8 images (NHW, or NHWC such as samples.npz's arr_0)."""
    return classifier_pass([model], images, batch_size)[0].argmax(-1).astype(np.int64)


def features_uint8(model: FashionClassifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Penultimate features float64 (N, D) for uint8 images (NHW or NHWC)."""
    return classifier_pass([model.features], images, batch_size)[0]


def accuracy(model: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Fraction of images whose predicted label equals `labels`."""
    was_training = model.training
    model.eval()
    try:
        return float(np.mean(predict_uint8(model, images, batch_size) == np.asarray(labels)))
    finally:
        model.train(was_training)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    flip: bool = True,
    config: ClassifierConfig | None = None,
    progress: bool = True,
) -> FashionClassifier:
    """Adam, cosine learning-rate decay over all steps, random horizontal flips; the model comes back in eval mode."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x_all = classifier_input(images)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(x_all) != len(y_all) or len(x_all) == 0:
        raise ValueError(f"need as many labels as images (and at least one): {len(x_all)} images, {len(y_all)} labels")
    config = config or ClassifierConfig()
    if int(y_all.min()) < 0 or int(y_all.max()) >= config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1}, got {int(y_all.min())}..{int(y_all.max())}")
    torch.manual_seed(seed)
    model = FashionClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=epochs * per_epoch, desc="train classifier", disable=not progress)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_all), generator=gen).split(batch_size):
            x, y = x_all[idx], y_all[idx]
            if flip:  # Fashion-MNIST items are left-right symmetric in kind
                mirrored = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def save_classifier(model: FashionClassifier, path: str | os.PathLike, **metadata: object) -> None:
    """Weights, config and metadata (e.g. test accuracy, epochs, seed) in one safetensors file, atomically."""
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.config))}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    save_tensors(path, model.state_dict(), meta)


def shipped_classifier_path() -> Path:
    return Path(str(resources.files("calicache") / "assets" / SHIPPED_FILE))


def classifier_metadata(path: str | os.PathLike | None = None) -> dict:
    """The decoded metadata of a classifier file (the shipped one by default)."""
    path = shipped_file(path) if path is not None else shipped_classifier_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no classifier file; train one with `calicache train-classifier --out {path}`"
        )
    raw = read_header(path, FIX)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a calicache classifier (format {raw.get('format')!r}); pass a file "
                         "written by `calicache train-classifier`")
    return decode_metadata(raw, path, FIX)


def load_classifier(path: str | os.PathLike | None = None) -> FashionClassifier:
    """The classifier in eval mode from `path`, or the shipped Fashion-MNIST one by default."""
    path = shipped_file(path) if path is not None else shipped_classifier_path()
    meta = classifier_metadata(path)
    cfg = dict(meta["config"])
    cfg["widths"] = tuple(cfg["widths"])
    model = FashionClassifier(ClassifierConfig(**cfg))
    state, _ = load_tensors(path, FIX)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the stored classifier config {cfg} ({e})") from e
    model.calicache_metadata = {k: v for k, v in meta.items() if k not in ("format", "config", "sha256")}
    return model.eval()

