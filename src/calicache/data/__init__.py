"""Data sets as uint8 arrays: Fashion-MNIST (IDX files), image folders and .npz files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .arrays import load_npz
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import load_fashion_mnist
from .folders import load_image_folder

__all__ = ["FASHION_MNIST_CLASSES", "load_dataset", "load_fashion_mnist", "load_image_folder", "load_npz"]

FASHION_MNIST = "fashion-mnist"


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    size: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W) or (N, H, W, C), labels int64 (N,) or None) for one data set.

    `spec` is "fashion-mnist" (IDX files in `data_dir`, $CALICACHE_FASHION_MNIST or Debian's
    /usr/share/datasets/fashion-mnist), a folder of images (class sub-folders give labels) or an
    .npz file (arr_0 images, arr_1 optional labels). `size` resizes and center-crops folder images;
    `split` picks "train"/"test" of Fashion-MNIST or a train/val/test sub-folder of a folder.
    """
    key = str(spec)
    if key == FASHION_MNIST:
        if size not in (None, 28):
            raise ValueError(f"Fashion-MNIST images are 28x28; size {size} is not available (leave it out)")
        return load_fashion_mnist(split, data_dir)
    path = Path(key)
    if path.is_dir():
        images, labels, _ = load_image_folder(path, split, size=size, progress=progress)
        return images, labels
    if path.suffix.lower() == ".npz":
        if split != "train":
            raise ValueError(f"{path}: an .npz file is one data set with no {split!r} split; pass that split's file")
        if size is not None:
            raise ValueError(f"{path}: resizing applies to image folders only; store the .npz at the size you need")
        return load_npz(path)
    if not path.exists():
        raise FileNotFoundError(
            f"data {key!r} not found: give {FASHION_MNIST!r}, a folder of images (one sub-folder per class "
            "for labels) or an .npz file with arr_0 = uint8 images"
        )
    raise ValueError(f"{path}: not a data set; give a folder of images or an .npz file (arr_0 = uint8 images)")
