"""MACs accounting against torch's flop counter (FLOPs = 2 x MACs), call by call."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calicache import FORAConfig, ICCConfig, NoCacheConfig, apply_cache, count_macs, remove_cache
from calicache.diffusion.schedule import Schedule
from conftest import tiny_model


@pytest.mark.parametrize("config", [
    NoCacheConfig(),
    FORAConfig(period=2),
    ICCConfig(period=2, rank=3),
    ICCConfig(period=3, rank="full"),
])
def test_per_call_macs_match_flop_counter(config, monkeypatch):
    # torch's flop counter does not see the fused CPU attention kernel: spell it out as matmuls.
    def explicit_attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    steps, batch = 6, 3
    m = apply_cache(tiny_model(), config)
    expected = count_macs(m, None, steps)
    x, y = torch.randn(batch, 1, 8, 8), torch.tensor([0, 1, 2])
    counted = []
    with torch.inference_mode():
        for t in reversed(Schedule.create(steps).timesteps):
            with FlopCounterMode(display=False) as fc:
                m(x, torch.full((batch,), int(t)), y)
            counted.append(fc.get_total_flops() // 2 // batch)
    remove_cache(m)
    assert counted == expected["per_call"]
    assert expected["total"] == sum(counted)


def test_dit_xl_numbers():
    none = count_macs("DiT-XL/2", NoCacheConfig(), 20)
    fora = count_macs("DiT-XL/2", FORAConfig(period=2), 20)
    icc = count_macs("DiT-XL/2", ICCConfig(period=2, rank=128), 20)
    assert abs(none["full_call"] / 1e9 - 118.6) < 0.1  # DiT paper Table 1: 118.6 Gflops (MACs) per call
    assert none["total"] == 20 * none["full_call"]
    c, n, d = 1152, 256, 28
    adaln = c * 6 * c
    attn = 2 * n * n * c
    icc_block = n * 2 * c * 3 * 128 + n * 2 * c * 128 + attn + n * 5 * c * 128 * 2 + adaln
    full_block = n * c * 3 * c + n * c * c + attn + n * c * 4 * c + n * 4 * c * c + adaln
    assert icc["per_call"][1] - icc["per_call"][0] == d * (icc_block - full_block)
    assert fora["per_call"][1] == none["full_call"] - d * (full_block - adaln)
    assert none["total_with_cfg"] == none["total"]
    assert count_macs("DiT-XL/2", NoCacheConfig(), 20, cfg_scale=1.5)["total_with_cfg"] == 2 * none["total"]


def test_counting_attaches_nothing(monkeypatch):
    """count_macs builds no engine and patches no module: not on a bare model, not beside an attached cache."""
    from calicache.cache import engine as engine_module

    model = tiny_model()
    apply_cache(model, FORAConfig(period=2))
    state = {name: dict(m.__dict__) for name, m in model.named_modules()}
    monkeypatch.setattr(engine_module.CacheEngine, "__init__", lambda *a, **k: pytest.fail("an engine was built"))
    icc = count_macs(model, ICCConfig(period=2, rank=3), 6)
    bare = tiny_model()
    assert count_macs(bare, ICCConfig(period=2, rank=3), 6) == icc
    assert all("forward" not in m.__dict__ for m in bare.modules())
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == state
    assert count_macs(model, None, 6) == count_macs(bare, FORAConfig(period=2), 6)
