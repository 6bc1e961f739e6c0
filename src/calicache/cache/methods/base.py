"""What every cache method shares: its config's base class (schedule, cache dtype, JSON files,
command-line flags), the engine link, and branch-level caching."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...metrics.inception import file_sha256
from ...models.io import shipped_file
from ...utils import atomic_path, warn_once
from ..schedule import CacheSchedule, check_period

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONFIG_FORMAT = "calicache-config"


@dataclass(frozen=True)
class Argument:
    """One command-line flag of a method config: `--flag TEXT` sets `field` to `parse(TEXT)`."""

    flag: str
    field: str
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _schedule_json(s: CacheSchedule) -> dict:
    """The schedule's fields that differ from their defaults, matrices as nested 0/1 lists."""
    out = {}
    for f in fields(s):
        v = getattr(s, f.name)
        if isinstance(v, np.ndarray):
            out[f.name] = v.astype(int).tolist()
        elif f.default is MISSING or v != f.default:
            out[f.name] = v
    return out


def _schedule_from_json(value: Any, where: str) -> CacheSchedule:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'schedule' must be a file path or an object like {{\"gather\": [[1, 1], [0, 1]]}}, "
                         f"got {type(value).__name__}")
    names = {f.name for f in fields(CacheSchedule)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{where}: unknown schedule key(s) {unknown}; a schedule has {sorted(names)}")
    if set(value) == {"gather"}:
        return CacheSchedule.from_matrix(np.asarray(value["gather"]))
    kw = dict(value)
    if "gather" in kw:
        kw["gather"] = CacheSchedule.from_matrix(np.asarray(kw["gather"])).gather
    return CacheSchedule(**kw)


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclass
class MethodConfig:
    """How to cache a model; one subclass per method, in the method's own file.

    - period: the FORA period p (call t is full when t % p == 0); default 2.
    - schedule: instead of a period, a `CacheSchedule`, a 0/1 gather matrix (calls x layers) or
      the path of one (JSON or npz). After construction `schedule` is always a `CacheSchedule`.
    - cache_dtype: dtype of the stored activations ("float16", torch.bfloat16, ...; None: the model's).

    `config.save(path)` writes it as JSON and `calicache.load_config(path)` reads it back.
    """

    method: ClassVar[str]  # the registry name, written to JSON files as "method"
    method_class: ClassVar[type]  # the hook-installing Method subclass
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("--period", "period", "FORA period: call t is full when t %% period == 0", int),
        Argument("--schedule", "schedule", "explicit gather matrix (JSON or npz) instead of --period"),
        Argument("--cache-dtype", "cache_dtype", "dtype of cached activations (default: the model's)",
                 choices=tuple(DTYPES)),
    )
    files: ClassVar[tuple[str, ...]] = ()  # fields naming files: JSON stores their path and sha256
    default_period: ClassVar[int] = 2

    period: int | None = None
    schedule: Any = field(default=None, compare=False)  # compared through _schedule_key (matrices)
    cache_dtype: Any = None
    _schedule_key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self._schedule_path: str | None = None
        s = self.schedule
        if s is not None and self.period is not None:
            raise ValueError("give period or schedule, not both (a schedule fixes every call already)")
        if s is None:
            period = self.default_period if self.period is None else self.period
            check_period(period, " (1 = no caching)")
            s = CacheSchedule.fora(period)
        elif isinstance(s, (str, os.PathLike)):
            self._schedule_path = os.fspath(s)
            s = CacheSchedule.load(s)
        elif not isinstance(s, CacheSchedule):
            s = CacheSchedule.from_matrix(np.asarray(s))
        self.schedule = s
        self.period = s.period
        self._schedule_key = json.dumps(_schedule_json(s), sort_keys=True)
        dtype = self.cache_dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown cache_dtype {dtype!r}; choose one of {sorted(DTYPES)}")
            self.cache_dtype = DTYPES[dtype]
        elif dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"cache_dtype must be a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")

    # -- command line ----------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MethodConfig:
        """This config from parsed flags (see `arguments`); flags not given keep the defaults."""
        kwargs = {}
        for a in cls.arguments:
            text = getattr(args, a.dest, None)
            if text is not None:
                try:
                    kwargs[a.field] = a.parse(text)
                except ValueError as e:
                    raise ValueError(f"{a.flag} {text}: {e}") from e
        return cls(**kwargs)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self, base: str | os.PathLike | None = None) -> dict:
        """{"method": ..., field: value}; file fields by path (relative to `base`) plus their sha256."""
        out: dict[str, Any] = {"format": CONFIG_FORMAT, "method": self.method}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "period" or not f.init:
                continue  # written with the schedule
            if f.name == "schedule":
                if self._schedule_path is not None:
                    out["schedule"] = _relative(self._schedule_path, base)
                    out["schedule_sha256"] = file_sha256(self._schedule_path)
                    continue
                js = _schedule_json(v)
                if set(js) == {"period"}:
                    out["period"] = js["period"]
                else:
                    out["schedule"] = js
            elif f.name == "cache_dtype":
                out[f.name] = None if v is None else str(v).removeprefix("torch.")
            elif f.name in self.files and v is not None:
                if not isinstance(v, (str, os.PathLike)):
                    raise ValueError(f"{f.name} is an in-memory {type(v).__name__}; save it to a file first "
                                     f"(`.save(path)`) and pass {f.name}=path")
                out[f.name] = os.fspath(v) if _shipped_name(v) else _relative(os.fspath(v), base)
                out[f"{f.name}_sha256"] = file_sha256(shipped_file(v))
            else:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write this config as JSON (atomically); an existing file is kept unless `overwrite`."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (or choose another path)")
        text = json.dumps(self.to_dict(base=path.parent), indent=2) + "\n"
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    @classmethod
    def from_dict(cls, data: dict, base: str | os.PathLike | None = None, where: str = "config") -> MethodConfig:
        """The inverse of `to_dict`: unknown keys, a wrong method or a changed file are errors."""
        data = dict(data)
        data.pop("format", None)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{where}: method {method!r} is not {cls.method!r}")
        names = {f.name for f in fields(cls) if f.init}
        digests = {f"{n}_sha256" for n in ("schedule",) + cls.files}  # a schedule by path is a file too
        unknown = sorted(set(data) - names - digests)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for method {cls.method!r}; "
                             f"its keys are {sorted(names | digests)}")
        kwargs = {}
        for k, v in data.items():
            if k in digests:
                continue
            if k == "schedule" and v is not None and not isinstance(v, str):
                v = _schedule_from_json(v, where)
            elif k == "schedule" or k in cls.files:
                _check_type(k, v, (str,), "a file path")
                if v is not None and not (k in cls.files and _shipped_name(v)):
                    v = _resolve(v, base)
                if v is not None:
                    _verify(k, shipped_file(v), data.get(f"{k}_sha256"), where, from_file=base is not None)
            elif k == "cache_dtype":
                _check_type(k, v, (str,), f"one of {sorted(DTYPES)} or null")
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e


def _relative(path: str, base: str | os.PathLike | None) -> str:
    if base is None:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def _shipped_name(path: str | os.PathLike) -> bool:
    """A shipped file's name (`fmnist-dit-cd`), kept as a name in config files: it works from any folder."""
    return shipped_file(path) != Path(path)


def _resolve(path: str, base: str | os.PathLike | None) -> str:
    return path if base is None or os.path.isabs(path) else os.path.join(os.fspath(base), path)


def _verify(key: str, path: str, digest: Any, where: str, from_file: bool) -> None:
    """The file a config names must be the one it was saved with. A hand-written config file without
    the file's sha256 loads: its hash is computed now and shown, once, with how to record it (a dict
    built in code is taken as given, like a config constructed with a path)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: {key} file {path} does not exist")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise ValueError(f"{where}: {key}_sha256 must be the file's sha256 (64 hex digits) or absent, got {digest!r}")
    if digest is None:
        if from_file:
            warn_once(f"{where}: no {key}_sha256, so {key} file {path} cannot be checked against the file the "
                      f"config was written for; add \"{key}_sha256\": \"{file_sha256(path)}\" to the config, or "
                      "write it with config.save(path), which records it", stacklevel=5)
    elif file_sha256(path) != digest:
        raise ValueError(f"{where}: {key} file {path} changed since the config was saved (sha256 differs); "
                         f"re-save the config for this file or restore the original")


def each(fn: Callable, *values):
    """`fn` applied to tensors, or element-wise to tuples of them (a joint-attention branch returns the image
    and the text stream)."""
    if isinstance(values[0], tuple):
        return tuple(fn(*vs) for vs in zip(*values))
    return fn(*values)


def tensors(value) -> tuple:
    """The tensors of a branch output (one, or a tuple of them)."""
    return value if isinstance(value, tuple) else (value,)


def first_order(v1: torch.Tensor, v0: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """v1 + k (v1 - v0): the first-order forecast from two samples of a trajectory, in one pass.
    With k = 0 it is v1 exactly, whatever v0 holds (an empty slot is zeros)."""
    return torch.lerp(v1, v0, -k)


def traced() -> bool:
    """Whether a torch.compile trace is running. A traced hook reads per-call values only as tensors
    (a forecast weight, a compensation weight of 0 or w) and never the host flags that vary between
    calls of one kind, so a run compiles one graph per kind of call (full, cached). Eager hooks
    branch on those flags to skip work that a zero weight would waste."""
    return torch.compiler.is_compiling()


class Method:
    """A cache method. Subclasses install hooks in `__init__` through `engine.patch`."""

    def __init__(self, engine, config: MethodConfig):
        self.engine = engine
        self.config = config
        self.cache_dtype = config.cache_dtype

    def store(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cache_dtype is None else t.to(self.cache_dtype)

    def reset(self) -> None:
        """Forget every cached tensor (run boundaries, removal)."""

    def check_run(self, num_calls: int) -> None:
        """Fail before a run of `num_calls` calls starts if the method cannot serve it."""

    def cache_bytes(self) -> int:
        return 0

    def begin_call(self) -> None:
        """Host-side work before each model call (engine.call and engine.full are set): no device reads."""

    def end_call(self) -> None:
        """Host-side work after each model call that finished: no device reads."""

    def cached_macs(self, layer: int, call: int) -> int:
        """MACs per sample of cacheable layer `layer` at a cached call (the papers' convention)."""
        return 0

    def full_macs(self, layer: int, call: int) -> int:
        """MACs per sample a full call of `layer` adds to the uncached computation (ICC's B pass)."""
        return 0


class BranchCache:
    """Serves whole branch outputs (pre-gate) at cached calls; `on_cached` decides what is served.

    Used by FORA (serve the last full output), GOC (extrapolate it) and the rank-0 branches of ICC and
    the forecast. A served branch never reads its input, so the LayerNorm that produces it (the
    adapter's `input_producer`) runs on one token per sample at such calls: the model's own
    modulation then broadcasts (N, 1, C) instead of computing (N, T, C), and the branch takes the
    result for its dtype only. Outputs are bit for bit those of the full producer (the model uses
    the produced value nowhere else); `skip_inputs = False` turns it off.
    """

    skip_inputs: ClassVar[bool] = True  # read when the cache is attached

    def __init__(self, method: Method, layers: list[int]):
        self.method = method
        self.layers = layers
        # Every key from the start: a compiled full call then sees the same dict at call 0 and later.
        self.outputs: dict[int, torch.Tensor | None] = dict.fromkeys(layers)
        engine = method.engine
        for layer in layers:
            engine.patch(engine.branches[layer].module, lambda fwd, layer=layer: self._hook(layer, fwd))
        if self.skip_inputs:
            for producer, fed in self.producers().items():
                engine.patch(producer, lambda fwd, fed=fed: self._producer_hook(fed, fwd))

    def producers(self) -> dict[nn.Module, tuple[int, ...]]:
        """Input producer -> the layers it feeds, for producers that feed only layers served here (a
        producer shared with a branch that reads its input, e.g. a calibrated one, must run in full)."""
        fed: dict[nn.Module, list[int]] = {}
        for layer, branch in enumerate(self.method.engine.branches):
            if branch.input_producer is not None:
                fed.setdefault(branch.input_producer, []).append(layer)
        mine = set(self.layers)
        return {m: tuple(layers) for m, layers in fed.items() if mine.issuperset(layers)}

    def _producer_hook(self, fed: tuple[int, ...], forward: Callable) -> Callable:
        engine = self.method.engine

        def run(x: torch.Tensor, *args, **kwargs):
            if not engine.in_call or any(engine.full[layer] or self.outputs[layer] is None for layer in fed):
                return forward(x, *args, **kwargs)
            return forward(x.narrow(-2, 0, 1), *args, **kwargs)  # (N, 1, C): every token's value is unused

        return run

    def _hook(self, layer: int, forward: Callable) -> Callable:
        engine = self.method.engine

        def run(*args, **kwargs):
            if engine.full[layer]:
                out = forward(*args, **kwargs)
                self.outputs[layer] = each(self.method.store, out)
                self.on_full(layer, out)
                return out
            if self.outputs[layer] is None:
                raise RuntimeError(f"layer {engine.branches[layer].name} has no cached output at call {engine.call}; "
                                   "the schedule must make every layer full at call 0")
            out = self.on_cached(layer)
            like = args[0] if args else next(iter(kwargs.values()))
            return each(lambda t: t.to(like.dtype), out)

        return run

    def on_full(self, layer: int, out: torch.Tensor) -> None:
        """Called after a full computation of `layer` (after `outputs` was updated)."""

    def on_cached(self, layer: int) -> torch.Tensor:
        return self.outputs[layer]

    def reset(self) -> None:
        self.outputs = dict.fromkeys(self.layers)

    def cache_bytes(self) -> int:
        return sum(t.nbytes for out in self.outputs.values() if out is not None for t in tensors(out))

    def macs(self, branch) -> int:
        """MACs per sample of serving `branch` at a cached call (FORA: nothing is computed)."""
        return 0
