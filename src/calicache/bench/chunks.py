"""Finished pieces of a long benchmark, kept on disk so that a rerun continues where the last one stopped.

A piece (a chunk of samples, or the features of one) is an npz under ROOT/GROUP/ named
`KIND-START-END-DIGEST.npz`, where DIGEST is the SHA-256 of a JSON object holding everything that
determines the piece (model weights, cache config with its files' hashes, steps, seed, sample indices,
the feature extractor...). The object itself is stored in the file and compared on loading, so a
changed setting never reuses a stale piece: it gets another name and is computed afresh. Pieces are
written atomically (temporary file + rename, `utils.Outputs`): a killed run leaves no partial piece,
only a temporary that the next whole run removes. One run at a time holds ROOT's lock, or several
shards of one run (`lock(shard=...)`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..images import save_npz
from ..utils import TEMP_MARK

KEY_FIELD = "piece_key"  # the npz member holding the piece's JSON key


def digest(key: dict) -> str:
    """SHA-256 (hex) of `key` in canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()


def canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class ChunkStore:
    """Pieces under `root`, looked up by (group, kind, start, end, key)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, group: str, kind: str, start: int, end: int, key: dict) -> Path:
        return self.root / group / f"{kind}-{start:06d}-{end:06d}-{digest(key)[:16]}.npz"

    def load(self, group: str, kind: str, start: int, end: int, key: dict,
             members: tuple[str, ...] | None = None) -> dict[str, np.ndarray] | None:
        """The piece's arrays (only `members` if given), or None when it is not there (or was made from
        other settings, or is unreadable)."""
        path = self.path(group, kind, start, end, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z[KEY_FIELD]) != canonical(key):
                    return None
                return {k: z[k] for k in z.files if k != KEY_FIELD and (members is None or k in members)}
        except (OSError, ValueError, KeyError):
            return None  # a damaged piece is recomputed and replaced

    def has(self, group: str, kind: str, start: int, end: int, key: dict) -> bool:
        return self.load(group, kind, start, end, key, members=()) is not None

    def save(self, group: str, kind: str, start: int, end: int, key: dict, **arrays: np.ndarray) -> Path:
        """Write the piece in one step (nothing at its path until it is complete)."""
        path = self.path(group, kind, start, end, key)
        save_npz(path, **{KEY_FIELD: np.array(canonical(key))}, **arrays)
        return path

    def stale_temps(self) -> list[Path]:
        """Temporaries of pieces that a killed run left behind."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.rglob(f".*{TEMP_MARK}.npz") if p.is_file() and not p.is_symlink()]

    @contextmanager
    def lock(self, shard: str | None = None) -> Iterator[None]:
        """Hold ROOT/.lock for this process (one writer per folder); remove stale temporaries once held.

        `shard`: one of several processes that split a run's work over this folder (each writes other
        pieces, under random temporary names). A shard holds ROOT/.lock shared, so that no whole run can
        start beside it, and ROOT/.lock-SHARD alone; it leaves temporaries to a whole run (a sibling may
        be writing one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as whole, open(self.root / f".lock-{shard or 'all'}", "a") as own:
            try:
                fcntl.flock(whole, fcntl.LOCK_SH | fcntl.LOCK_NB if shard else fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another run is using {self.root} (it holds a lock file there); wait for it "
                                   "to finish or choose another --out") from None
            try:
                if shard is None:
                    for p in self.stale_temps():
                        p.unlink()
                yield
            finally:
                fcntl.flock(own, fcntl.LOCK_UN)
                fcntl.flock(whole, fcntl.LOCK_UN)
