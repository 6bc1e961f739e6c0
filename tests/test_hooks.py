"""Hooks that compose: calicache with another library's forward wrappers (a plain one, diffusers'
HookRegistry, group offloading, accelerate's model CPU offload), applied and removed in every order."""

import itertools

import pytest
import torch

from calicache import FORAConfig, ICCConfig, apply_cache, remove_cache, sample
from calicache.cache import get_engine
from conftest import tiny_model

diffusers = pytest.importorskip("diffusers")
from diffusers import hooks  # noqa: E402
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading  # noqa: E402

from conftest import dit_pipe, tiny_dit  # noqa: E402
from conftest import pipe_latents as run  # noqa: E402

CONFIG = ICCConfig(period=2, rank=4)  # patches the model, its branches and its linears
# FORA patches the model, its branches and their input producers (the norms it runs on one token when serving).
CONFIGS = {"icc": CONFIG, "fora": FORAConfig(period=2)}


def test_an_instance_forward_is_wrapped_and_put_back_exactly():
    model = tiny_model()
    ref = sample(model, 2, 4, seed=0)
    calls = []
    original = model.forward

    def theirs(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = theirs
    apply_cache(model, FORAConfig(period=1))
    assert torch.equal(sample(model, 2, 4, seed=0), ref) and len(calls) == 4
    remove_cache(model)
    assert model.__dict__["forward"] is theirs
    del model.forward
    assert "forward" not in model.__dict__ and torch.equal(sample(model, 2, 4, seed=0), ref)


def test_a_dropped_hook_is_a_clear_error():
    """A library that writes back the forward it saw over ours: the next run says so, removal still works."""
    model = tiny_model()
    ref = sample(model, 2, 4, seed=0)
    original = model.forward
    model.forward = lambda *args, **kwargs: original(*args, **kwargs)
    apply_cache(model, CONFIG)
    model.forward = original  # their removal, as they saw it
    with pytest.raises(RuntimeError, match="replaced by another library"):
        sample(model, 2, 4, seed=0)
    remove_cache(model)
    assert model.__dict__["forward"] is original and torch.equal(sample(model, 2, 4, seed=0), ref)


def test_a_wrapper_added_after_ours_survives_removal():
    model = tiny_model()
    ref = sample(model, 2, 4, seed=0)
    cached = sample(apply_cache(model, CONFIG), 2, 4, seed=0)
    ours = model.forward
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    model.forward = theirs
    assert torch.equal(sample(model, 2, 4, seed=0), cached)
    remove_cache(model)
    assert model.__dict__["forward"] is theirs and get_engine(model) is None  # theirs kept, our state gone
    assert torch.equal(sample(model, 2, 4, seed=0), ref) and len(calls) == 8


class Count(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


class Registry:
    """A trivial diffusers hook on the transformer and on modules calicache also patches."""

    def __init__(self, pipe):
        t = pipe.transformer
        self.modules = [t, t.transformer_blocks[0].attn1, t.transformer_blocks[1].ff.net[2],
                        t.transformer_blocks[0].norm1.norm, t.transformer_blocks[1].norm3]
        self.hooks = [Count() for _ in self.modules]

    def apply(self):
        for m, h in zip(self.modules, self.hooks):
            HookRegistry.check_if_exists_or_initialize(m).register_hook(h, "count")

    def remove(self):
        for m in self.modules:
            m._diffusers_hook.remove_hook("count", recurse=False)

    def ran(self) -> bool:
        return all(h.calls > 0 for h in self.hooks)


class GroupOffload:
    """diffusers' group offloading at leaf level: a hook on every linear (CPU to CPU here)."""

    def __init__(self, pipe):
        self.t = pipe.transformer

    def apply(self):
        apply_group_offloading(self.t, onload_device=torch.device("cpu"), offload_type="leaf_level")

    def remove(self):
        registry = HookRegistry.check_if_exists_or_initialize(self.t)
        for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
            registry.remove_hook(name, recurse=True)

    def ran(self) -> bool:
        linear = self.t.transformer_blocks[0].ff.net[2]
        return linear._diffusers_hook.get_hook("group_offloading") is not None


class ModelOffload:
    """accelerate's hooks through the pipeline's `enable_model_cpu_offload` (CPU as the device here)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def apply(self):
        self.pipe.enable_model_cpu_offload(device="cpu")

    def remove(self):
        self.pipe.remove_all_hooks()

    def ran(self) -> bool:
        return hasattr(self.pipe.transformer, "_hf_hook")


@pytest.fixture(scope="module", params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]


@pytest.fixture(scope="module")
def expected(config):
    pipe = dit_pipe()
    plain = run(pipe)
    cached = run(apply_cache(pipe, config))
    remove_cache(pipe)
    return plain, cached


@pytest.mark.parametrize("other", [Registry, GroupOffload, ModelOffload])
@pytest.mark.parametrize("ours_first, ours_removed_first", list(itertools.product([True, False], repeat=2)))
def test_both_orders_of_applying_and_removing(config, expected, other, ours_first, ours_removed_first):
    plain, cached = expected
    pipe = dit_pipe()
    theirs = other(pipe)
    steps = [lambda: apply_cache(pipe, config), theirs.apply]
    for step in steps if ours_first else steps[::-1]:
        step()
    assert torch.equal(run(pipe), cached) and theirs.ran()
    if ours_removed_first:
        remove_cache(pipe)
        assert torch.equal(run(pipe), plain)  # their hooks keep working without ours
        theirs.remove()
    else:
        theirs.remove()
        assert torch.equal(run(pipe), cached)  # ours survives their removal, beneath or around them
        remove_cache(pipe)
    assert torch.equal(run(pipe), plain)
    assert get_engine(pipe) is None and get_engine(pipe.transformer) is None


def _remove_diffusers_hooks(model):
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        for name in reversed(list(getattr(registry, "_hook_order", []))):
            registry.remove_hook(name, recurse=False)


@pytest.mark.parametrize("apply", [
    lambda t: hooks.apply_first_block_cache(t, diffusers.FirstBlockCacheConfig(threshold=0.1)),
    lambda t: hooks.apply_taylorseer_cache(t, diffusers.TaylorSeerCacheConfig(
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])),
    lambda t: hooks.apply_faster_cache(t, diffusers.FasterCacheConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500)),
    lambda t: hooks.apply_pyramid_attention_broadcast(t, diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500)),
], ids=["FirstBlockCache", "TaylorSeer", "FasterCache", "PAB"])
def test_a_model_with_a_diffusers_cache_is_refused(apply):
    t = tiny_dit()
    apply(t)
    with pytest.raises(ValueError, match="already has a diffusers cache"):
        apply_cache(t, FORAConfig())
    assert get_engine(t) is None
    _remove_diffusers_hooks(t)
    apply_cache(t, FORAConfig())  # once it is gone, calicache attaches
    remove_cache(t)


def test_a_diffusers_cache_added_to_a_bare_transformer_after_ours_is_refused_at_its_next_run():
    """A bare cached transformer driven by the pipeline's own loop (implicit runs) is checked at each run start,
    as an explicit run is: never two caches serving each other's outputs."""
    pipe = dit_pipe()
    ref = run(pipe)
    apply_cache(pipe.transformer, FORAConfig(period=1))
    assert torch.equal(run(pipe), ref)
    hooks.apply_first_block_cache(pipe.transformer, diffusers.FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="already has a diffusers cache"):
        run(pipe)
    _remove_diffusers_hooks(pipe.transformer)
    assert torch.equal(run(pipe), ref)
    remove_cache(pipe.transformer)
    assert torch.equal(run(pipe), ref)
