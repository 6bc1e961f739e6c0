"""Independent references: our DiT vs diffusers' DiTTransformer2DModel, our DDIM vs diffusers' DDIMScheduler,
and the ADM respacing rule written out here on its own.

The diffusers model is filled by a key mapping written in this file (not calicache.models.convert), so a
wrong mapping in either place cannot hide the other.
"""

import pytest
import torch

from calicache.diffusion.samplers import ddim
from calicache.diffusion.schedule import Schedule, respaced_timesteps
from calicache.models.io import load_model
from conftest import rel, tiny_model

diffusers = pytest.importorskip("diffusers")


def reference_diffusers(state: dict, cfg, time_shift: float, norm_eps: float):
    """diffusers' DiT holding an original-layout state dict (mapping written from diffusers' module names)."""
    d = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=norm_eps,
    )
    new = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"], "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for i in range(cfg.depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        q, k, v = state[o + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[o + "attn.qkv.bias"].chunk(3)
        new.update({
            b + "attn1.to_q.weight": q, b + "attn1.to_k.weight": k, b + "attn1.to_v.weight": v,
            b + "attn1.to_q.bias": qb, b + "attn1.to_k.bias": kb, b + "attn1.to_v.bias": vb,
            b + "attn1.to_out.0.weight": state[o + "attn.proj.weight"],
            b + "attn1.to_out.0.bias": state[o + "attn.proj.bias"],
            b + "norm1.linear.weight": state[o + "adaLN_modulation.1.weight"],
            b + "norm1.linear.bias": state[o + "adaLN_modulation.1.bias"],
            b + "ff.net.0.proj.weight": state[o + "mlp.fc1.weight"],
            b + "ff.net.0.proj.bias": state[o + "mlp.fc1.bias"],
            b + "ff.net.2.weight": state[o + "mlp.fc2.weight"], b + "ff.net.2.bias": state[o + "mlp.fc2.bias"],
            b + "norm1.emb.class_embedder.embedding_table.weight": state["y_embedder.embedding_table.weight"],
            b + "norm1.emb.timestep_embedder.linear_1.weight": state["t_embedder.mlp.0.weight"],
            b + "norm1.emb.timestep_embedder.linear_1.bias": state["t_embedder.mlp.0.bias"],
            b + "norm1.emb.timestep_embedder.linear_2.weight": state["t_embedder.mlp.2.weight"],
            b + "norm1.emb.timestep_embedder.linear_2.bias": state["t_embedder.mlp.2.bias"],
        })
        d.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = time_shift
    d.load_state_dict(new, strict=True)
    return d.eval()


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A tiny DiT saved as the original code saves it: a plain state dict in a .pt file."""
    model = tiny_model(seed=3, depth=2, hidden_size=32, num_heads=2)
    with torch.no_grad():  # a timestep MLP large enough that the frequency shift is visible
        model.t_embedder.mlp[0].weight.normal_(0, 0.5)
        model.t_embedder.mlp[2].weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    return path, model.config


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([0, 1, 250, 500, 750, 999])
    y = torch.tensor([0, 1, 2, 3, cfg.num_classes, 1])  # includes the null class
    return x, t, y


@torch.no_grad()
def test_dit_matches_diffusers_reference(original_checkpoint):
    path, cfg = original_checkpoint
    ours = load_model(path, {"num_heads": cfg.num_heads})
    state = torch.load(path, weights_only=True)
    assert set(ours.state_dict()) == set(state)  # the original key layout loads as it is
    x, t, y = _inputs(cfg)
    out = ours(x, t, y)
    assert out.shape == (6, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)  # eps then variance
    ref = reference_diffusers(state, cfg, time_shift=0, norm_eps=1e-6)(x, t, y).sample
    assert out.abs().mean() > 1e-2  # not a vacuous all-zero model
    assert rel(out, ref) < 1e-5


@torch.no_grad()
def test_diffusers_default_settings_differ_from_original(original_checkpoint):
    """diffusers' time-projection shift 1 is not the original: the test above is not vacuous.

    (eps 1e-5 vs 1e-6 is a ~1e-6 relative effect that float32 often rounds away on these inputs.)
    """
    path, cfg = original_checkpoint
    state = torch.load(path, weights_only=True)
    x, t, y = _inputs(cfg)
    ours = load_model(path, {"num_heads": cfg.num_heads})(x, t, y)
    shifted = reference_diffusers(state, cfg, time_shift=1, norm_eps=1e-6)(x, t, y).sample
    assert rel(shifted, ours) > 1e-3


def _model_fn(model, labels):
    def fn(x, t):
        with torch.no_grad():
            return model(x, t, labels)
    return fn


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_leading_follows_diffusers_ddim(steps):
    model = tiny_model(seed=5)
    labels = torch.tensor([0, 3])
    fn = _model_fn(model, labels)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False, steps_offset=0,
    )
    sched.set_timesteps(steps)
    schedule = Schedule.create(steps, "leading")
    assert sched.timesteps.tolist() == schedule.timesteps[::-1].tolist()
    x = x_T.clone()
    for t in sched.timesteps:
        eps = fn(x, t.expand(2))[:, :1]
        x = sched.step(eps, t, x).prev_sample
    ours = ddim(fn, x_T.clone(), schedule)
    assert rel(ours, x) < 1e-5


def adm_space_timesteps(num_timesteps: int, section_counts: list[int]) -> list[int]:
    """ADM's respacing rule (improved-diffusion `space_timesteps`): each of the equal sections keeps
    `count` steps, stepping a float stride (size - 1) / (count - 1) from the section start and rounding."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


def test_adm_spacing_20_steps():
    expected = [0, 53, 105, 158, 210, 263, 315, 368, 421, 473, 526, 578, 631, 684, 736, 789, 841, 894, 946, 999]
    assert respaced_timesteps(20, "adm") == expected
    assert adm_space_timesteps(1000, [20]) == expected
    assert Schedule.create(20, "adm").timesteps.tolist() == expected


@pytest.mark.parametrize("steps", [2, 5, 10, 21, 23, 27, 50, 100, 250])
def test_adm_spacing_matches_adm_rule(steps):
    # 21, 23, 27 are counts where float accumulation and exact rounding disagree; ADM accumulates.
    assert respaced_timesteps(steps, "adm") == adm_space_timesteps(1000, [steps])


def test_leading_spacing_is_ddim_s():
    assert respaced_timesteps(20, "leading") == list(range(0, 1000, 50))
