"""calicache's tensor files: safetensors with JSON metadata and a content checksum, and torch
checkpoints loaded weights-only.

Every file calicache writes (models, factor files, classifiers) stores `sha256`, a digest of its
tensors (names, dtypes, shapes and bytes), in the metadata; loading recomputes it, so a file whose
tensors were changed after writing (tampering, a bad copy) is a clear error instead of silently
different outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as save_bytes

from .utils import Outputs, write_file

CHECKSUM_KEY = "sha256"


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 outputs: Outputs | None = None) -> Path:
    """Write `tensors` and string `metadata` (plus their checksum) to `path`, exclusively and atomically.

    With `outputs`, the file joins that set and is committed with it (the temporary file it is in until
    then is returned); else it is committed now and `path` is returned."""
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) | {CHECKSUM_KEY: tensor_checksum(state)}
    data = save_bytes(state, metadata=meta)
    if outputs is None:
        write_file(path, data)
        return Path(path)
    return outputs.write(path, data)


def read_header(path: str | os.PathLike, fix: str) -> dict[str, str]:
    """The raw string metadata of a safetensors file; an unreadable file is an error ending in `fix`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}; it may be truncated or damaged); {fix}") from e


def load_tensors(path: str | os.PathLike, fix: str,
                 require_checksum: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, raw metadata) of a safetensors file, with its checksum verified.

    A file without a checksum is an error when `require_checksum` (calicache has always written it
    for that kind of file), else loads with a note on stderr (files from before checksums, or made
    by other tools). `fix` says how to get a good file."""
    path = Path(path)
    header = read_header(path, fix)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read the tensors ({e}); the file may be truncated. {fix}") from e
    stored = header.get(CHECKSUM_KEY)
    if stored is None:
        if require_checksum:
            raise ValueError(f"{path}: the file carries no content checksum (`{CHECKSUM_KEY}` in its metadata), so "
                             f"its tensors cannot be verified; {fix}")
        if "format" in header:  # a calicache file from before checksums
            print(f"calicache: note: {path} carries no content checksum (written by an older calicache); "
                  "its tensors are not verified", file=sys.stderr)
    elif tensor_checksum(tensors) != stored:
        raise ValueError(f"{path}: the tensors do not match the file's checksum: the file was changed or damaged "
                         f"after it was written; {fix}")
    return tensors, header


def decode_metadata(header: Mapping[str, str], path: object, fix: str) -> dict:
    """JSON-decoded metadata values (`format` and the checksum stay strings)."""
    out = {}
    for k, v in header.items():
        if k in ("format", CHECKSUM_KEY):
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable metadata {k!r} ({e}); {fix}") from e
    return out


def read_torch(path: str | os.PathLike, fix: str) -> object:
    """A torch checkpoint loaded weights-only (tensors, plain containers and the original train.py's
    argparse.Namespace, which only holds plain values). Anything else, including a file that is not
    a checkpoint at all, is an error ending in `fix`; pickled code never runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests loading with weights_only=False (running the file's code): never pass that on.
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if detail is not None:
            raise ValueError(f"{path}: refused to load: the file holds pickled objects other than tensors "
                             f"({detail}); calicache loads weights only: {fix}") from e
        raise ValueError(f"{path}: not a torch weights file (it does not unpickle as tensors); {fix}") from e
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first}); "
                         f"the file may be truncated or corrupt; {fix}") from e
    except Exception as e:  # noqa: BLE001 - random bytes make the unpickler fail in many ways
        raise ValueError(f"{path}: not a torch checkpoint ({type(e).__name__} while unpickling); {fix}") from e
