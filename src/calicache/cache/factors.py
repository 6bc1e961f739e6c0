"""Factor files: ICC's low-rank factors as data (safetensors + JSON metadata), tied to one model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..adapters import LinearSpec
from ..models.io import shipped_file
from ..tensorfile import load_tensors, save_tensors
from ..utils import Outputs
from .state import shared_method

FORMAT = "calicache-factors"
FIX = "re-create it with `calicache calibrate`"


def shared_factors(engine, config) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The factors of the cache `engine.shares` (a guidance twin's original, or the attached cache a MACs
    count reads) when it was built from this very config: views of what its calibrated linears hold, so
    nothing is loaded, hashed or decomposed again. None: there is no such cache; resolve them."""
    method = shared_method(engine, config)
    if not hasattr(method, "linears"):
        return None
    out = {}
    for linear in method.linears:  # each holds B of its blocks stacked (R, C_i) and A^T per block
        start = 0
        for spec, rank, a_t in zip(linear.specs, linear.ranks, linear.a_t):
            out[spec.name] = (a_t.t(), linear.b[start:start + rank])
            start += rank
    for layer in method.whole_branch:  # rank 0 everywhere: the branch is served whole, its linears hold nothing
        for spec in engine.shares.branches[layer].linears:
            w = spec.module.weight
            out[spec.name] = (w.new_zeros(spec.out_features, 0), w.new_zeros(0, spec.in_features))
    return out


@dataclass
class Factors:
    """`tensors[name] = (A (C_o, r), B (r, C_i))` per calibrated linear; columns ordered by
    singular value, so keeping the first r' < r columns is exactly the rank-r' factorisation."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {k: int(a.shape[1]) for k, (a, _) in self.tensors.items()}

    def select(self, rank: int | str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors at `rank`: None keeps each stored rank, an int truncates every layer to it."""
        if rank is None:
            return dict(self.tensors)
        out = {}
        for name, (a, b) in self.tensors.items():
            r = min(a.shape[0], b.shape[1]) if rank == "full" else int(rank)
            if r > a.shape[1]:
                hint = ("this file holds per-layer ranks chosen under a MACs budget: use rank=None (omit --rank)"
                        if self.meta.get("rank_budget") is not None else "calibrate again with a higher --rank")
                raise ValueError(f"rank {r} is higher than the {a.shape[1]} stored for {name} in this factor file; "
                                 f"{hint}")
            out[name] = (a[:, :r].contiguous(), b[:r].contiguous())
        return out

    def check(self, specs: list[LinearSpec], model_hash: str | None) -> None:
        """Refuse factors made for another model or another shape."""
        if model_hash is not None and self.meta.get("model_hash") not in (None, model_hash):
            raise ValueError(
                f"factor file was made for model {str(self.meta.get('model_hash'))[:12]}... but this model's weights "
                f"hash to {model_hash[:12]}...; calibrate this model with `calicache calibrate`"
            )
        names = {s.name for s in specs}
        missing = sorted(names - set(self.tensors))
        extra = sorted(set(self.tensors) - names)
        if missing or extra:
            raise ValueError(f"factor file does not fit this model: missing {missing[:4]}, unexpected {extra[:4]}")
        for s in specs:
            a, b = self.tensors[s.name]
            if a.shape[0] != s.out_features or b.shape[1] != s.in_features or a.shape[1] != b.shape[0]:
                raise ValueError(f"factor shapes for {s.name} are A {tuple(a.shape)}, B {tuple(b.shape)}; the model's "
                                 f"weight is {s.out_features}x{s.in_features}")

    def save(self, path: str | os.PathLike, outputs: Outputs | None = None) -> None:
        """One safetensors file with a content checksum; with `outputs`, committed with that set."""
        tensors = {}
        for name, (a, b) in self.tensors.items():
            tensors[f"{name}.A"] = a.contiguous().float()
            tensors[f"{name}.B"] = b.contiguous().float()
        meta = {"format": FORMAT, "meta": json.dumps(self.meta | {"ranks": self.ranks()})}
        save_tensors(path, tensors, meta, outputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Factors:
        """A factor file, or a shipped one by name (`fmnist-dit-cd`)."""
        path = shipped_file(path)
        if not path.exists():
            raise FileNotFoundError(f"factor file {path} does not exist; make one with `calicache calibrate`")
        if path.is_dir():
            raise ValueError(f"factor file {path} is a folder; pass the .safetensors file `calicache calibrate` wrote")
        raw, header = load_tensors(path, FIX)
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a calicache factor file (format {header.get('format')!r}); "
                             "make one with `calicache calibrate`")
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable factor metadata ({e}); {FIX}") from e
        tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = {key.rsplit(".", 1)[0] for key in raw}
        for name in sorted(names):
            if f"{name}.A" not in raw or f"{name}.B" not in raw:
                raise ValueError(f"{path}: {name} lacks its A or B factor; {FIX}")
            tensors[name] = (raw[f"{name}.A"], raw[f"{name}.B"])
        return cls(tensors, meta)
