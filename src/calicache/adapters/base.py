"""What the cache engine needs to know about a model family: its cacheable branches, the linear
layers inside them, how to read the timestep of a call, and the MACs of its parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass
class LinearSpec:
    """One calibrated linear map: the rows `rows` of `module` (all rows if None).

    q, k and v of DiT's fused qkv are three specs on one module. `input_from` names another linear
    of the same branch whose output, passed through `input_fn`, is this linear's input (fc2's input
    is GELU(fc1's output)): CD/CF calibration statistics recompute fc2's reference input from fc1's
    reference output instead of holding a second copy. The cache itself stores no inputs.
    """

    name: str
    module: nn.Linear
    rows: slice | None = None
    input_from: str | None = None
    input_fn: Callable | None = None
    tokens: int | None = None  # rows per sample it sees; None: the branch's `tokens` (set by BranchSpec)

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        if self.rows is None:
            return self.module.out_features
        return len(range(*self.rows.indices(self.module.out_features)))

    def weight(self):
        w = self.module.weight
        return w if self.rows is None else w[self.rows]


@dataclass
class BranchSpec:
    """One cacheable layer in the papers' sense: a block branch whose output is cached pre-gate."""

    name: str
    module: nn.Module
    linears: list[LinearSpec]
    tokens: int  # N: tokens the branch sees per sample (its attention's queries; its linears' default)
    attention_dim: int = 0  # C of the softmax(QK^T)V matmuls (0: no attention)
    kv_tokens: int | None = None  # keys/values per sample (cross-attention), default N
    # Elements per sample of the branch output (what FORA stores, GOC and the forecast update); None: N x the
    # last linear's outputs. Joint attention returns two streams (image and text): the adapter gives their sum.
    output_size: int | None = None
    # The token-wise module (a LayerNorm) whose output reaches this branch as its only input through
    # element-wise code alone (adaLN's modulate) and goes nowhere else. At a call that serves the branch
    # without reading its input, the cache runs it on one token per sample instead of all (see
    # `BranchCache`). None: no such module (the input is the residual stream itself, or also used elsewhere).
    input_producer: nn.Module | None = None

    def __post_init__(self) -> None:
        for s in self.linears:
            if s.tokens is None:
                s.tokens = self.tokens

    def output_elements(self) -> int:
        """Elements per sample of the branch output."""
        if self.output_size is not None:
            return self.output_size
        return self.tokens * self.linears[-1].out_features

    def attention_macs(self) -> int:
        """QK^T and AV: 2 N N_kv C per sample."""
        if not self.attention_dim:
            return 0
        return 2 * self.tokens * (self.kv_tokens or self.tokens) * self.attention_dim

    def full_macs(self) -> int:
        return sum(s.tokens * s.in_features * s.out_features for s in self.linears) + self.attention_macs()


class Adapter:
    """Base adapter. Subclasses say where branches are and what runs outside them."""

    def branches(self, model: nn.Module) -> list[BranchSpec]:
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict):
        """The timestep tensor of a top-level call."""
        raise NotImplementedError

    def sample_input(self, args: tuple, kwargs: dict):
        """The noisy input tensor of a top-level call (checked for NaN)."""
        raise NotImplementedError

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Refuse a top-level call whose arguments change which branches run (host-side, before the call)."""

    def base_macs(self, model: nn.Module) -> int:
        """MACs per sample outside the branches, paid by every call (embeddings, adaLN, final layer)."""
        raise NotImplementedError

    # Run constants: modules whose output depends only on conditioning that is fixed through a run
    # (the prompt: cross-attention keys/values, a caption projection). Models without any keep these defaults.
    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose output depends only on `text_input`: computed once per run and reused exactly."""
        return []

    def text_input(self, args: tuple, kwargs: dict):
        """The tensor the constant modules depend on, of a top-level call (None: nothing to reuse)."""
        return None

    def constant_macs(self, model: nn.Module) -> int:
        """MACs per sample of `constant_modules`: paid once per run when reused, at every call otherwise."""
        return 0
