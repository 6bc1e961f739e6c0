"""Run constants: modules whose output depends only on the prompt (cross-attention keys and values,
a caption projection) are computed once per run and reused exactly at the later calls.

Inside an explicit run (`cache_run`, `calicache.sample`, a cached pipeline's call) the prompt is
constant, so the values computed at call 0 serve the whole run with no check at all. A bare module
in another library's loop checks instead that the top-level conditioning tensor is the one the
values were computed from: identity plus the version counter (no in-place change) or, when that
cannot tell (another tensor object, or an inference tensor without a version counter),
`torch.equal` against a copy (a device read, the bare path's price). A new prompt, batch size or
dtype recomputes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


class RunConstants:
    def __init__(self, engine, modules: list[nn.Module]):
        self.engine = engine
        self.values: dict[int, torch.Tensor] = {}  # module index -> its output for `key`
        self.key: torch.Tensor | None = None  # copy of the conditioning the values were computed from
        self._source: torch.Tensor | None = None  # the tensor object itself (held, so its id cannot be reused)
        self._source_version: int | None = None
        self.active = False  # False: this call has no conditioning; modules run as usual
        for i, module in enumerate(modules):
            engine.patch(module, lambda forward, i=i: self._hook(i, forward))

    def _same(self, text: torch.Tensor) -> bool:
        if self.key is None:
            return False
        if text is self._source and self._source_version is not None and _version(text) == self._source_version:
            return True
        return (text.shape == self.key.shape and text.dtype == self.key.dtype and text.device == self.key.device
                and torch.equal(text, self.key))

    def begin_call(self, text: torch.Tensor | None) -> None:
        """Called before every top-level call with its conditioning tensor (None: nothing to reuse)."""
        self.active = isinstance(text, torch.Tensor)
        if not self.active:
            return
        if self.engine.explicit:
            if self.engine.call == 0:  # reset at the run's start; the prompt is constant through the run
                self.values.clear()
            return
        if self._same(text):
            return
        self.values.clear()
        self.key = text.detach().clone()
        self._source, self._source_version = text, _version(text)

    def _hook(self, i: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if not self.active:
                return forward(*args, **kwargs)
            out = self.values.get(i)
            if out is None:
                out = self.values[i] = forward(*args, **kwargs)
            return out

        return run

    def reset(self) -> None:
        self.values.clear()
        self.key = self._source = self._source_version = None

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.values.values()) + (self.key.nbytes if self.key is not None else 0)
