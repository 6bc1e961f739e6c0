"""Model-space tensors to images: uint8 NHWC arrays, optional VAE decoding, grids and npz files."""

from __future__ import annotations

import functools
import io
import math
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from .utils import write_file

LATENT_SCALE = 0.18215


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3); one channel is replicated to three."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {tuple(x.shape)}; decode latents with a VAE first")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


@functools.lru_cache(maxsize=1)  # sharded sampling decodes shard after shard with one VAE
def _load_vae(vae: str) -> torch.nn.Module:
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise RuntimeError("decoding latents needs diffusers: pip install diffusers") from e
    return AutoencoderKL.from_pretrained(vae).eval()


@torch.inference_mode()
def decode_latents(latents: torch.Tensor, vae: str, batch_size: int = 8) -> torch.Tensor:
    """SD-VAE decoding of DiT latents (scaled by 0.18215) with diffusers' AutoencoderKL."""
    model = _load_vae(vae)
    out = [model.decode(z / LATENT_SCALE).sample for z in latents.split(batch_size)]
    return torch.cat(out)


def grid(images: np.ndarray, cols: int | None = None) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL image, row-major."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(canvas)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    write_file(path, png_bytes(image))


def open_npz(path: str | os.PathLike, fix: str) -> np.lib.npyio.NpzFile:
    """An .npz archive opened without pickles; any other file is an error ending in `fix` (never numpy's
    advice to allow pickles)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(6)
        what = ("not a readable .npz file (a truncated or damaged zip archive)" if start.startswith(b"PK\x03\x04")
                else "not an .npz file: it holds a single .npy array, not an .npz archive" if start == b"\x93NUMPY"
                else "not an .npz file (an .npz is a zip archive of arrays)")
        raise ValueError(f"{path}: {what}; {fix}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e}); {fix}") from e


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez's format with fixed zip timestamps (see npz_bytes), written in one step."""
    write_file(path, npz_bytes(**arrays))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """np.savez's format (one stored .npy member per array), but with fixed zip timestamps:
    equal arrays give equal file bytes, so sharded and single-process runs can be compared."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()
