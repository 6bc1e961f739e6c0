"""Block-level serving: at a call that serves a branch whole (FORA, GOC, rank-0 branches), the LayerNorm
that produces the branch's input runs on one token per sample; every output stays bit for bit the
full computation's (`BranchCache.skip_inputs = False`)."""

import pytest
import torch

from calicache import apply_cache, config_from_dict, remove_cache, sample
from calicache.adapters import get_adapter
from calicache.cache import get_engine
from calicache.cache.methods.base import BranchCache
from conftest import dit_pipe, pipe_latents, pixart_pipe, tiny_model

STEPS = 6
TOKENS = 16  # tiny_model: 8 x 8 pixels in 2 x 2 patches
SERVED = {
    "fora": dict(method="fora", period=2),
    "goc": dict(method="goc", period=2, steps=[3, 5]),
    "icc-rank0": dict(method="icc", period=3, rank=0),
    "forecast-rank0": dict(method="forecast", period=2, rank=0, order=2),
    # Per branch: attention and MLP of one block full and cached at different calls.
    "fora-per-branch": dict(method="fora", schedule={"gather": [[1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 1],
                                                                [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]}),
}


def record(producers) -> list[int]:
    """Tokens per sample each producer's output has, call after call (in the order the model runs them)."""
    seen = []
    for p in producers:
        p.register_forward_hook(lambda mod, args, out: seen.append(out.shape[-2]))
    return seen


def cached_run(model, config: dict) -> tuple[torch.Tensor, list[tuple[bool, ...]]]:
    """Samples and the per-call full flags of one cached run; the model is left without a cache."""
    apply_cache(model, config_from_dict(config))
    try:
        out = sample(model, 2, STEPS, cfg_scale=2.0)
        return out, list(get_engine(model).full_flags)
    finally:
        remove_cache(model)


def expected_tokens(flags: list[tuple[bool, ...]], tokens: int) -> list[int]:
    return [tokens if full else 1 for row in flags for full in row]


def test_dit_adapter_names_the_norms():
    m = tiny_model()
    producers = [b.input_producer for b in get_adapter(m).branches(m)]
    assert producers == [m for blk in m.blocks for m in (blk.norm1, blk.norm2)]


@pytest.mark.parametrize("name", list(SERVED))
def test_served_branches_run_their_norm_on_one_token(name, monkeypatch):
    m = tiny_model()
    seen = record(b.input_producer for b in get_adapter(m).branches(m))
    out, flags = cached_run(m, SERVED[name])
    assert seen == expected_tokens(flags, TOKENS) and 1 in seen
    assert not any("forward" in vars(mod) for mod in m.modules())  # removal takes the producer hooks too
    seen.clear()
    monkeypatch.setattr(BranchCache, "skip_inputs", False)
    full, _ = cached_run(m, SERVED[name])
    assert seen == [TOKENS] * len(seen)
    assert torch.equal(out, full)


def test_branches_that_read_their_input_keep_their_norm():
    """ICC's calibrated branches compute on the current input: their norms run in full and are not hooked."""
    m = tiny_model()
    producers = [b.input_producer for b in get_adapter(m).branches(m)]
    seen = record(producers)
    apply_cache(m, config_from_dict(dict(method="icc", period=2, rank=3)))
    assert not any("forward" in vars(p) for p in producers)
    sample(m, 2, STEPS, cfg_scale=2.0)
    remove_cache(m)
    assert seen == [TOKENS] * (STEPS * 4)


def test_a_shared_producer_runs_in_full_while_one_of_its_branches_is_full(monkeypatch):
    """A producer feeding two branches is cut only at calls that serve both."""
    from calicache.adapters.dit import DiTAdapter

    def shared(self, model):
        out = branches(self, model)
        for attn, mlp in zip(out[::2], out[1::2]):
            mlp.input_producer = attn.input_producer  # norm1 declared for both branches of its block
        return out

    branches = DiTAdapter.branches
    monkeypatch.setattr(DiTAdapter, "branches", shared)
    m = tiny_model()
    seen = record(blk.norm1 for blk in m.blocks)
    _, flags = cached_run(m, SERVED["fora-per-branch"])
    both_served = [not (row[2 * i] or row[2 * i + 1]) for row in flags for i in range(2)]
    assert seen == [1 if s else TOKENS for s in both_served] and 1 in seen


# -- diffusers: DiT (AdaLayerNormZero's inner norm, norm3) and PixArt (norm1, norm2; attn2 has none) --------
PIPES = {"dit": dit_pipe, "pixart": pixart_pipe}


def producers_of(pipe, kind: str):
    blocks = pipe.transformer.transformer_blocks
    if kind == "dit":
        return [m for b in blocks for m in (b.norm1.norm, b.norm3)]
    return [m for b in blocks for m in (b.norm1, None, b.norm2)]


@pytest.mark.parametrize("kind", list(PIPES))
@pytest.mark.parametrize("config", [dict(method="fora", period=2), dict(method="goc", period=2, steps=[3, 5])],
                         ids=["fora", "goc"])
def test_diffusers_blocks_serve_bit_for_bit(kind, config, monkeypatch):
    pipe = PIPES[kind]()
    expected = producers_of(pipe, kind)
    branches = get_adapter(pipe.transformer).branches(pipe.transformer)
    assert [b.input_producer for b in branches] == expected
    seen = record(p for p in expected if p is not None)
    apply_cache(pipe, config_from_dict(config))
    out = pipe_latents(pipe)
    flags = list(get_engine(pipe).full_flags)
    remove_cache(pipe)
    tokens = branches[0].tokens
    assert seen == [tokens if f else 1 for row in flags for f, p in zip(row, expected) if p is not None]
    assert 1 in seen
    monkeypatch.setattr(BranchCache, "skip_inputs", False)
    apply_cache(pipe, config_from_dict(config))
    assert torch.equal(out, pipe_latents(pipe))
    remove_cache(pipe)



def test_a_norm_called_outside_a_model_call_runs_in_full():
    """A bare module driven by another library's loop keeps its cache and its last call's flags between
    calls: a producer called by hand there is a plain LayerNorm, not the one-token cut of a served call."""
    m = tiny_model()
    apply_cache(m, config_from_dict(SERVED["fora"]))
    try:
        c = m.config
        x, y = torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.tensor([1, 2])
        for t in (900.0, 800.0):  # call 0 full, call 1 cached
            m(x, torch.full((2,), t), y)
        assert get_engine(m).full == (False,) * 4
        h = torch.randn(3, TOKENS, m.config.hidden_size)
        assert torch.equal(m.blocks[0].norm1(h), torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6))
    finally:
        remove_cache(m)
