"""Image arrays in .npz files, as `calicache sample` and the ADM evaluator write them."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..images import open_npz


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W) or (N, H, W, C), labels int64 (N,) or None) from `arr_0` and optional `arr_1`.

    `arr_0` is NHWC (C = 1, 3 or 4) or NHW; a single channel comes back as (N, H, W). Channels are
    kept as stored (samples.npz replicates grayscale to three channels, as the ADM evaluator expects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file; pass a file with arr_0 = uint8 images (N, H, W[, C])")
    f = open_npz(path, "re-create it with np.savez(path, images_uint8[, labels])")
    try:
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with f:
            keys = set(f.files)
            images = f["arr_0"] if "arr_0" in keys else None
            labels = f["arr_1"] if "arr_1" in keys else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(
            f"{path}: not a readable .npz file ({e}); re-create it with np.savez(path, images_uint8[, labels])"
        ) from e
    if images is None:
        raise ValueError(
            f"{path}: no 'arr_0' array (found {sorted(keys)}); save the images as the first positional "
            "array: np.savez(path, images_uint8, labels)"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: arr_0 has dtype {images.dtype}, expected uint8; store pixels as 0..255 integers, "
            "e.g. ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for images in [-1, 1]"
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (3, 4))):
        raise ValueError(
            f"{path}: arr_0 has shape {images.shape}; expected (N, H, W) or channels-last (N, H, W, C) with "
            "C in 1, 3, 4 (transpose NCHW arrays with a.transpose(0, 2, 3, 1))"
        )
    if len(images) == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: arr_1 must be integer labels of shape ({len(images)},), got {labels.dtype} "
                f"{labels.shape}; leave arr_1 out for unlabelled images"
            )
        if labels.min() < 0:
            raise ValueError(f"{path}: arr_1 holds negative labels; labels are class indices 0..K-1")
        labels = labels.astype(np.int64)
    return images, labels
