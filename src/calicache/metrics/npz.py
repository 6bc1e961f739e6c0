"""Reading sample and reference batches in the ADM npz layout, with clear errors.

`arr_0`: uint8 images (N, H, W, C) with C in {1, 3} or (N, H, W); `arr_1`: optional class labels;
`prompts`: optional text prompts; ADM reference batches may also hold precomputed Inception
statistics `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (spatial).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..images import open_npz

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_LAYOUT = "expected an npz with arr_0 = uint8 images (N, H, W, 3|1) as `calicache sample` writes"


@dataclass
class ImageBatch:
    path: str
    images: np.ndarray | None  # uint8 (N, H, W, C)
    labels: np.ndarray | None = None
    prompts: list[str] | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num(self) -> int:
        return 0 if self.images is None else len(self.images)


def check_images(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, H, W, C) with C in {1, 3}; (N, H, W) gains a channel axis. Anything else: ValueError."""
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images are {images.dtype}, not uint8 in [0, 255]; {_LAYOUT}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = " (channels first? the ADM layout is channels last)" if images.ndim == 4 and images.shape[1] in (1, 3) \
            else ""
        raise ValueError(f"{where}: images have shape {images.shape}{hint}; {_LAYOUT}")
    if len(images) == 0:
        raise ValueError(f"{where}: the batch holds no images; {_LAYOUT}")
    return images


def load_batch(path: str | os.PathLike, require_images: bool = True) -> ImageBatch:
    """Read an npz batch; missing, corrupt, empty or mis-shaped files are clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {_LAYOUT}")
    with open_npz(path, _LAYOUT) as npz:
        try:
            keys = set(npz.files)
            images = npz["arr_0"] if "arr_0" in keys else None
            labels = npz["arr_1"] if "arr_1" in keys else None
            prompts = npz["prompts"] if "prompts" in keys else None
            stats = {k: npz[k] for k in STAT_KEYS if k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable npz file ({e}); {_LAYOUT}") from e
    if images is None:
        if require_images or not {"mu", "sigma"} <= stats.keys():
            raise ValueError(f"{path}: no arr_0 in the file (keys: {sorted(keys)}); {_LAYOUT}")
    else:
        images = check_images(images, str(path))
    if labels is not None:
        labels = labels.reshape(-1)
        if images is not None and len(labels) != len(images):
            raise ValueError(f"{path}: {len(labels)} labels (arr_1) for {len(images)} images")
    if prompts is not None:
        prompts = [str(p) for p in prompts.reshape(-1)]
    return ImageBatch(str(path), images, labels, prompts, stats)
