"""Writing outputs safely: every output is checked before any work, written to an exclusive temporary
file with an unpredictable name in its own folder, and all of a command's outputs are committed
together (renamed into place; on a failure the ones already renamed are rolled back, so a folder
holds the old set or the new set, never a mix). Nothing follows a symbolic link at an output path:
renaming replaces the link itself. Also: file hashes, warnings shown once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp"  # temporaries are named .NAME.<random>.tmp<suffix of NAME> (the suffix kept for loaders)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out",
                 inputs: Iterable[str | os.PathLike] = (), folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot or must not be written: a folder where a file
    goes (or a file where a folder goes), a parent that is a file or not writable, an existing file
    without `overwrite`, and any of the command's `inputs` (never replaced, even with `overwrite`)."""
    path = Path(path)
    for src in inputs:
        if src is not None and os.path.exists(src) and os.path.lexists(path) and os.path.samefile(src, path):
            raise ValueError(f"{flag} {path} is also an input of this command ({src}); write to another path")
    if os.path.lexists(path):
        if folder and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file, but this output is a folder; give a folder path")
        if not folder and path.is_dir() and not path.is_symlink():
            raise ValueError(f"{flag} {path} is a folder, but this output is a file; give a file path "
                             f"such as {path / 'out'}{path.suffix or ''}")
        if not folder and not overwrite:
            raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another path")
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, not a folder; choose an output under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {base} (permission denied); choose a writable folder")
    return path


def _mkstemp(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK + path.suffix)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions open() gives
    return fd, Path(name)


def make_temp(path: Path, directory: bool = False) -> Path:
    """An exclusive, unpredictably named temporary file (or private folder) beside `path`, created now
    (O_EXCL, so an existing name or a planted link is never opened)."""
    if directory:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK))
    fd, name = _mkstemp(path)
    os.close(fd)
    return name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


class Outputs:
    """A command's outputs, written to temporaries and committed as one step.

    `temp(path)` reserves a temporary for `path`; `commit()` renames every temporary into place;
    if any rename fails, the outputs already renamed are put back as they were (the old file, or
    none) and the error is raised. Use as a context manager: it commits when the block succeeds
    and removes the temporaries when it fails (or is interrupted)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final path)

    def temp(self, path: str | os.PathLike) -> Path:
        """A temporary file for `path`, for writers that need a file name (prefer `write`)."""
        path = Path(path)
        tmp = make_temp(path)
        self._pending.append((tmp, path))
        return tmp

    def write(self, path: str | os.PathLike, data: bytes | str) -> Path:
        """`data` into a new temporary file for `path`, through the descriptor that created it (the
        name is never opened again, so nothing can be swapped in between); returns the temporary."""
        path = Path(path)
        fd, tmp = _mkstemp(path)
        self._pending.append((tmp, path))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return tmp

    def commit(self) -> None:
        done: list[tuple[Path, Path | None]] = []  # (final path, where its old file went, or None)
        placed = 0
        try:
            for tmp, path in self._pending:
                if path.is_dir() and not path.is_symlink():
                    raise IsADirectoryError(f"{path} is a folder, not a file; move it away and run again")
                backup = None
                if os.path.lexists(path):
                    backup = make_temp(path)
                    os.replace(path, backup)
                done.append((path, backup))
                os.replace(tmp, path)
                placed += 1
        except BaseException:
            for i, (path, backup) in reversed(list(enumerate(done))):  # roll back: the folder keeps the old set
                try:
                    if i < placed:
                        path.unlink()
                    if backup is not None:
                        os.replace(backup, path)
                except OSError:  # best effort: the original error is the one to report
                    pass
            self.discard()
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink()
        self._pending = []

    def discard(self) -> None:
        for tmp, _ in self._pending:
            if os.path.lexists(tmp):
                _remove(tmp)
        self._pending = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` by `data` in one step (see Outputs.write)."""
    with Outputs() as outputs:
        outputs.write(path, data)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A failure (or an interrupt) leaves neither a partial file nor a changed old one. The temporary
    is created exclusively with an unpredictable name (see Outputs), so no planted link is followed.
    """
    with Outputs() as outputs:
        yield outputs.temp(path)


def stale_temps(folder: Path, name_pattern: str) -> list[Path]:
    """Temporary files for outputs named like `name_pattern` (a glob) left in `folder` by killed processes."""
    suffix = Path(name_pattern).suffix
    return [p for p in folder.glob(f".{name_pattern}.*{TEMP_MARK}{suffix}") if stat.S_ISREG(p.lstat().st_mode)]


_WARNED: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """A UserWarning shown once per process for each message, whatever the warnings filters say."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory(mmap_threshold: int = 1 << 25) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse: blocks up to `mmap_threshold` bytes come from
    the heap rather than fresh mappings, and the heap is not trimmed. PyTorch's CPU tensors are plain
    malloc blocks, and with glibc's defaults a DiT forward maps and unmaps its activations on every call;
    each new page then faults in again (docs/speed.md). The price is that a process keeps its peak heap
    until it exits.

    Process-wide, so the command line calls it and a library import does not; once per process (cached).
    Skipped (returns False) off glibc, when `CALICACHE_KEEP_FREED_MEMORY=0`, or when the user set
    malloc's own environment variables; returns True when both settings were applied."""
    if os.environ.get("CALICACHE_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    import ctypes

    libc = ctypes.CDLL(None)  # the process's own symbols: mallopt of the libc it runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: another libc's mallopt takes other parameters
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    return bool(applied and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
