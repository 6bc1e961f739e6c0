"""Sharded sampling under torchrun: batch j of the global sample indices goes to rank j % world,
each batch is written as one shard file, reruns skip finished shards, and rank 0 merges them into
the samples.npz a single process with the same batch size writes, byte for byte.

Shards live in OUT/shards/<settings hash>/batch-000012.npz (uint8 NHWC `images`, `labels`, the
global `indices` and the full `settings` hash). The hash covers everything that can change a pixel,
so a shard made with other settings is never merged: it sits in another folder, and one copied
into this folder is refused with an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .images import decode_latents, save_npz, to_uint8
from .models.io import weight_hash
from .sampling import _class_labels, sample
from .utils import file_sha256, stale_temps, write_file

SHARD_DIR = "shards"
SHARD_KEYS = ("images", "labels", "indices", "settings")
# Command-line options that never change a pixel. Every other option goes into the settings hash,
# so an option added later can only make shards be recomputed, never merge stale ones.
NON_PIXEL_OPTIONS = frozenset({"out", "json", "threads", "model", "dist_timeout", "nproc_per_node", "overwrite",
                               "command"})


def settings_digest(settings: Mapping) -> str:
    """SHA-256 of the settings in canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_settings(args: argparse.Namespace, model: nn.Module, **resolved: object) -> dict:
    """Everything that can change the samples of `calicache sample`: every option but the few in
    NON_PIXEL_OPTIONS, the resolved defaults, the weights (weight_hash, so the same weights in another
    file or place share shards), the model config and the settings recommended in its file, the
    contents of every file an option names, and the torch version and device type (kernels differ in
    the last bits between them)."""
    options = {k: v for k, v in vars(args).items() if k not in NON_PIXEL_OPTIONS and not k.startswith("_")}
    options.update(resolved)
    files = {k: file_sha256(v) for k, v in options.items() if isinstance(v, str) and Path(v).is_file()}
    param = next(model.parameters())
    return {
        "options": options,
        "files": files,
        "weights": weight_hash(model),
        "recommended": dict(getattr(model, "calicache_defaults", {}) or {}),  # e.g. clip_denoised from the file
        "config": model.config.to_dict(),
        "calicache": __version__,
        "torch": torch.__version__,
        "device": param.device.type,
    }


def shard_folder(out: str | os.PathLike, digest: str) -> Path:
    return Path(out) / SHARD_DIR / digest[:16]


def shard_path(folder: Path, batch: int) -> Path:
    return folder / f"batch-{batch:06d}.npz"


def read_shard(path: Path, digest: str, indices: range) -> tuple[np.ndarray, np.ndarray]:
    """A finished shard's (images, labels), checked against this run's settings and batch."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in SHARD_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable shard ({e}); delete it and rerun to compute it again") from e
    stored = str(data["settings"])
    if stored != digest:
        raise ValueError(f"{path}: shard was made with other settings (hash {stored[:16]}, this run {digest[:16]}) "
                         f"and does not belong in {path.parent}; move it away and rerun")
    if not np.array_equal(data["indices"], np.arange(indices.start, indices.stop)):
        raise ValueError(f"{path}: shard holds samples {data['indices'][:1]}..{data['indices'][-1:]} but this "
                         f"batch is {indices.start}..{indices.stop - 1}; delete it and rerun")
    images, labels = data["images"], data["labels"]
    if images.dtype != np.uint8 or len(images) != len(indices) or len(labels) != len(indices):
        raise ValueError(f"{path}: shard holds {images.dtype} images of shape {images.shape} and {len(labels)} "
                         f"labels for {len(indices)} samples; delete it and rerun")
    return images, labels


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, indices: range, digest: str) -> None:
    save_npz(path, images=images, labels=labels, indices=np.arange(indices.start, indices.stop, dtype=np.int64),
             settings=np.array(digest))


def merge_shards(folder: Path, digest: str, batches: Sequence[range]) -> tuple[np.ndarray, np.ndarray]:
    """All shards in batch order: (uint8 images, int64 labels), the arrays a single process writes."""
    images: np.ndarray | None = None
    labels = np.empty(batches[-1].stop, dtype=np.int64)
    for j, idx in enumerate(tqdm(batches, desc="merging shards", disable=len(batches) < 100)):
        part, part_labels = read_shard(shard_path(folder, j), digest, idx)
        if images is None:  # filled in place: the merged array is the only full-size copy
            images = np.empty((batches[-1].stop, *part.shape[1:]), dtype=np.uint8)
        images[idx.start : idx.stop] = part
        labels[idx.start : idx.stop] = part_labels
    for tmp in stale_temps(folder, "batch-*.npz"):  # left by ranks killed mid-write; every rank is done now
        tmp.unlink(missing_ok=True)
    return images, labels


def sample_sharded(
    model: nn.Module,
    out: str | os.PathLike,
    num: int,
    batch_size: int,
    settings: Mapping,
    sample_kwargs: Mapping,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray] | None:
    """This rank's batches of a sampling job, as shards; on rank 0 also wait for all ranks and return
    the merged (images, labels); other ranks return None. `sample_kwargs` go to calicache.sample
    (steps, sampler, classes, seed, ...); `settings` must describe all of them (see sample_settings)."""
    digest = settings_digest(settings)
    distributed.check_same(digest, "the sampling settings hash (weights, options, files, torch version)")
    folder = shard_folder(out, digest)
    rank, world = distributed.rank(), distributed.world_size()
    if rank == 0:
        # For people: which run the folder belongs to.
        write_file(folder / "settings.json", json.dumps({"hash": digest, **settings}, indent=2, default=str))
    batches = distributed.batches(num, batch_size)
    if rank == 0 and len(batches) < world:
        print(f"calicache: {num} samples in batches of {batch_size} keep only {len(batches)} of {world} ranks "
              "busy; pass a smaller --batch-size to spread the work", file=sys.stderr)
    mine = [(j, idx) for j, idx in enumerate(batches) if j % world == rank]
    merged = distributed.Counter("merged")  # 1 once rank 0 has merged
    finished = {j for j, _ in mine if shard_path(folder, j).exists()}
    for j, idx in mine:  # checked before any work, so a foreign or broken shard fails fast
        if j in finished:
            read_shard(shard_path(folder, j), digest, idx)
    todo = [(j, idx) for j, idx in mine if j not in finished]
    classes = sample_kwargs.get("classes")
    num_classes = model.config.num_classes
    # Samples in finished shards, over all ranks; every rank leaves the block once all are done.
    with distributed.job_progress(num, "sampling", progress) as advance:
        advance(sum(len(idx) for j, idx in mine if j in finished))
        for j, idx in todo:
            x = sample(model, len(idx), start=idx.start, batch_size=batch_size, **sample_kwargs)
            images = to_uint8(decode(x) if decode is not None else x)
            labels = _class_labels(classes, idx.stop, num_classes)[idx.start :].numpy()
            write_shard(shard_path(folder, j), images, labels, idx, digest)
            advance(len(idx))
    if rank != 0:
        # Stay until rank 0 has merged, so that a failure anywhere fails every rank; the barrier
        # keeps rank 0 (which may host the store) alive until everyone has seen the flag.
        distributed.wait_for(merged, 1)
        distributed.barrier()
        return None
    result = merge_shards(folder, digest, batches)
    merged.add(1)
    distributed.barrier()
    return result


def sample_command(args: argparse.Namespace, model: nn.Module, steps: int, cfg_scale: float,
                   sample_kwargs: Mapping) -> tuple[np.ndarray, np.ndarray, int, float] | None:
    """`calicache sample` under torchrun: join the job, sample this rank's shards, merge on rank 0.

    Returns (images, labels, world size, seconds) on rank 0 and None on the others. An error on any
    rank ends every rank with its message (distributed.guard)."""
    timeout = getattr(args, "dist_timeout", None)
    with distributed.process_group(timeout) as world, distributed.guard():
        t0 = time.perf_counter()
        batch_size = args.batch_size if args.batch_size is not None else args.num  # 0 is an error below
        settings = sample_settings(args, model, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size,
                                   sample_kwargs=dict(sample_kwargs))
        decode = (lambda x: decode_latents(x, args.vae)) if args.vae else None
        result = sample_sharded(model, args.out, args.num, batch_size, settings, sample_kwargs, decode)
        if result is None:
            return None
        return (*result, world, time.perf_counter() - t0)
