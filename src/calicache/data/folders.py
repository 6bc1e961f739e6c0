"""Image folders: ImageNet layout (one sub-folder per class) or a flat folder of unlabelled images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})
# 8-bit modes that hold no colour; other 8-bit modes (RGB, RGBA, P, CMYK, ...) are converted to RGB.
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES)


def split_folder(root: Path, split: str) -> Path:
    """`root/split` when `root` is split into train/val/test sub-folders, else `root` itself.

    A folder without split sub-folders is one data set; asking it for another split than "train"
    is an error rather than silently handing back the training images.
    """
    subdirs = [p for p in root.iterdir() if p.is_dir() and _visible(p)]
    if subdirs and all(p.name in SPLIT_NAMES for p in subdirs):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root} is split into {sorted(p.name for p in subdirs)} but has no {split!r} folder; "
                f"choose one of those splits"
            )
        return root / split
    if split != "train":
        raise ValueError(
            f"{root} has no train/val/test sub-folders, so it has no {split!r} split; "
            "pass the folder of that split itself (split='train' uses a folder as it is)"
        )
    return root


def folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an ImageNet-layout folder, sorted; their positions are the labels."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and _visible(p))


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, antialiased), then the central size x size square (ADM's crop)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open(path: Path, size: int | None) -> tuple[np.ndarray, bool]:
    """uint8 (H, W) for grayscale files or (H, W, 3) for colour ones, and whether it is grayscale."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode.startswith(("I", "F")):  # 32-bit int, 16-bit, float: no faithful 8-bit reading
                raise ValueError(
                    f"{path}: image mode {mode!r} (16-bit, 32-bit or float) is not supported; convert it to "
                    "8-bit grayscale or RGB first (e.g. with PIL or ImageMagick)"
                )
            img = img.convert("L" if mode in _GRAY_MODES else "RGB")
            if size is not None:
                img = _resize_center_crop(img, size)
            return np.asarray(img, dtype=np.uint8), mode in _GRAY_MODES
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read this image ({e}); remove or replace the file") from e


def _stack(paths: list[Path], size: int | None, progress: bool) -> np.ndarray:
    arrays, gray = [], []
    for path in tqdm(paths, desc="load images", disable=not progress, leave=False):
        a, g = _open(path, size)
        arrays.append(a)
        gray.append(g)
    if not all(gray):
        # Colour wins: grayscale files among colour ones are replicated to three channels.
        arrays = [np.repeat(a[..., None], 3, axis=-1) if g else a for a, g in zip(arrays, gray)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        by_shape = {a.shape: p for a, p in zip(arrays, paths)}
        examples = ", ".join(f"{p.name} {s[:2]}" for s, p in list(by_shape.items())[:3])
        raise ValueError(
            f"images differ in size ({examples}); pass a size (--image-size) to resize and center-crop "
            "them to one square size"
        )
    return np.stack(arrays)


def load_image_folder(
    root: str | os.PathLike, split: str = "train", size: int | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,) or None, class names).

    ImageNet layout: `root/<class>/**/image` gives labels by the sorted class names (as torchvision's
    ImageFolder); images directly in `root` with no class sub-folders give labels None. If `root` holds
    train/val/test sub-folders, `split` picks one. The result stays one channel when every file is
    grayscale. `size` resizes the shorter side and center-crops to size x size.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass a folder of images or of class folders")
    if size is not None and size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    root = split_folder(root, split)
    classes = folder_classes(root)
    loose = _images_under(root, recursive=False)
    if not classes:
        if not loose:
            raise ValueError(
                f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                "put images in it, or one sub-folder of images per class"
            )
        return _stack(loose, size, progress), None, []
    if loose:
        raise ValueError(
            f"{root} mixes class sub-folders with {len(loose)} loose images (e.g. {loose[0].name}); "
            "move every image into its class folder, or use a folder without sub-folders for unlabelled images"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(root / name, recursive=True)
        if not found:
            raise ValueError(f"class folder {root / name} holds no images; remove it or add images")
        paths += found
        labels += [label] * len(found)
    return _stack(paths, size, progress), np.asarray(labels, dtype=np.int64), classes
