"""The DiT family: registry, config errors, adaLN-Zero, output layout and the fixed embeddings."""

import math

import numpy as np
import pytest
import torch

from calicache.models.dit import DIT_MODELS, DiTConfig, TimestepEmbedder, create_model, make_config
from conftest import randomize, tiny_model

# The paper's Table 1 sizes: (depth, width, heads).
PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_registry_has_every_paper_config(size, patch):
    cfg = DIT_MODELS[f"DiT-{size}/{patch}"]
    depth, width, heads = PAPER_SIZES[size]
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, patch)
    # 256x256 ImageNet latents: 4 channels at 32x32, 1000 classes, eps + learned variance.
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes, cfg.out_channels) == (4, 32, 1000, 8)
    assert cfg.mlp_ratio == 4.0 and cfg.learn_sigma and cfg.class_dropout_prob == 0.1
    assert cfg.num_tokens == (32 // patch) ** 2


def test_xl2_is_the_default_and_head_dims_match_the_paper():
    assert make_config() == DIT_MODELS["DiT-XL/2"]
    xl = DIT_MODELS["DiT-XL/2"]
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.out_channels) == (28, 1152, 16, 8)
    assert xl.hidden_size // xl.num_heads == 72
    for size in ("S", "B", "L"):
        cfg = DIT_MODELS[f"DiT-{size}/2"]
        assert cfg.hidden_size // cfg.num_heads == 64


@pytest.mark.parametrize("name", ["DiT-S/8", "DiT-S/4", "DiT-B/8"])
def test_small_registry_models_build_with_registry_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, depth=1)  # one block keeps the test fast; widths are the registry's
    cfg = DIT_MODELS[name]
    p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    assert model.x_embedder.proj.weight.shape == (d, c, p, p)
    assert model.pos_embed.shape == (1, cfg.num_tokens, d)
    assert model.y_embedder.embedding_table.weight.shape == (cfg.num_classes + 1, d)  # + the null class
    assert model.blocks[0].attn.qkv.weight.shape == (3 * d, d)
    assert model.blocks[0].mlp.fc1.weight.shape == (4 * d, d)
    assert model.blocks[0].attn.num_heads == cfg.num_heads
    assert model.final_layer.linear.weight.shape == (p * p * 2 * c, d)


def test_overrides_replace_fields_and_keep_the_rest():
    cfg = make_config("DiT-S/2", depth=3, num_classes=7, learn_sigma=False)
    assert (cfg.depth, cfg.num_classes, cfg.out_channels) == (3, 7, 4)
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (384, 6, 2)
    model = create_model("DiT-Tiny/2", input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    assert model.config.depth == 1 and len(model.blocks) == 1
    assert model.y_embedder.embedding_table.weight.shape == (4, 32)


def test_unknown_names_and_fields_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XXL/2'.*DiT-XL/2"):
        create_model("DiT-XXL/2")
    with pytest.raises(ValueError, match=r"unknown DiT config fields \['width'\].*hidden_size"):
        create_model("DiT-S/2", width=64)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        make_config("DiT-S/2", input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        make_config("DiT-S/2", num_heads=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        DiTConfig(hidden_size=18, num_heads=2)


def test_fresh_model_outputs_exactly_zero_and_randomize_fixes_that():
    torch.manual_seed(0)
    model = create_model("DiT-Tiny/2", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4).eval()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 1, 4])  # 4 is the null class
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero: gates and final layer start at 0
        out = randomize(model)(x, t, y)
    assert out.abs().mean() > 1e-3


def test_output_layout_is_n_2c_h_w_as_the_original_unpatchify():
    model = tiny_model(in_channels=3, input_size=8, patch_size=2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    tokens = {}
    model.final_layer.register_forward_hook(lambda m, i, o: tokens.setdefault("out", o))
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 6, 8, 8)  # eps (3) then variance values (3)
    # Independent unpatchify: token (r, c) holds a p x p patch, vector index (i * p + j) * C_out + ch.
    vec, p, c_out, g = tokens["out"], 2, 6, 4
    expected = torch.empty_like(out)
    for r in range(g):
        for c in range(g):
            for i in range(p):
                for j in range(p):
                    for ch in range(c_out):
                        expected[:, ch, r * p + i, c * p + j] = vec[:, r * g + c, (i * p + j) * c_out + ch]
    assert torch.equal(out, expected)
    no_sigma = tiny_model(learn_sigma=False)
    with torch.no_grad():
        assert no_sigma(torch.randn(2, 1, 8, 8), t, y).shape == (2, 1, 8, 8)


def _sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT 2-D embedding written out: first half encodes the column, second half the row,
    each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim / 4))."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                row = out[r * grid + c]
                row[k], row[quarter + k] = math.sin(c * w), math.cos(c * w)
                row[2 * quarter + k], row[3 * quarter + k] = math.sin(r * w), math.cos(r * w)
    return out


@pytest.mark.parametrize(("dim", "grid"), [(32, 4), (64, 7)])
def test_pos_embed_matches_independent_sincos(dim, grid):
    model = create_model("DiT-Tiny/2", input_size=2 * grid, hidden_size=dim, depth=1, num_heads=2, num_classes=2)
    ref = torch.from_numpy(_sincos_reference(dim, grid)).float()
    torch.testing.assert_close(model.pos_embed[0], ref, atol=1e-6, rtol=0)
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()  # saved, as the original checkpoints have it


def test_timestep_embedding_matches_the_documented_formula():
    # DiT (Peebles & Xie; facebookresearch/DiT models.py, TimestepEmbedder):
    # emb = cat(cos(t f), sin(t f)), f_i = exp(-ln(10000) i / 128), i = 0..127.
    t = torch.tensor([0, 1, 53, 500, 999])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert emb.shape == (5, 256)
    ref = np.zeros((5, 256))
    for n, tv in enumerate(t.tolist()):
        for i in range(128):
            f = math.exp(-math.log(10000) * i / 128)
            ref[n, i], ref[n, 128 + i] = math.cos(tv * f), math.sin(tv * f)
    torch.testing.assert_close(emb, torch.from_numpy(ref).float(), atol=2e-4, rtol=0)
    # At t = 0 the embedding is exactly cos = 1, sin = 0.
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_null_class_and_label_dropout_only_in_training():
    model = tiny_model()
    emb = model.y_embedder
    labels = torch.tensor([0, 1, 2, 3])
    drop = torch.tensor([True, False, True, False])
    out = emb(labels, drop)
    assert torch.equal(out[0], emb.embedding_table.weight[4]) and torch.equal(out[1], emb.embedding_table.weight[1])
    assert torch.equal(emb(labels), emb.embedding_table(labels))  # eval mode: no random dropout


def test_residual_stream_is_contiguous_and_that_changes_no_value():
    """The conv's tokens are a transposed view; a stream in that layout makes every LayerNorm copy.
    Made contiguous once, the output is bit for bit the one the transposed stream gives."""
    model = tiny_model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    layouts = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        out = model(x, t, y)
        hook.remove()
        h = model.x_embedder(x) + model.pos_embed  # the original's order: a transposed (N, T, D) view
        assert not h.is_contiguous()
        c = model.t_embedder(t) + model.y_embedder(y)
        for block in model.blocks:
            h = block(h, c)
        expected = model.unpatchify(model.final_layer(h, c))
    assert layouts == [True] and torch.equal(out, expected)
