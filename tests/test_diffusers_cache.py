"""Caching diffusers' DiT and PixArt-alpha transformers inside their pipelines: exactness identities,
runs per pipeline call, prompt-constant cross-attention K/V, removal, MACs against torch's flop counter,
and our DiT vs its diffusers conversion under the same cache."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calicache import (
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    NoCacheConfig,
    apply_cache,
    config_from_dict,
    count_macs,
    remove_cache,
)
from calicache.cache import cache_run, get_engine
from calicache.diffusion.guidance import guided_model_fn
from calicache.diffusion.samplers import ddim
from calicache.diffusion.schedule import Schedule
from conftest import (
    CAPTION,
    PIPE_STEPS,
    TEXT_TOKENS,
    cli,
    count_linear,
    dit_pipe,
    pixart_pipe,
    prompts,
    rel,
    tiny_dit,
    tiny_model,
    tiny_pixart,
)
from conftest import pipe_latents as run

diffusers = pytest.importorskip("diffusers")

STEPS = PIPE_STEPS


def layers(pipe) -> int:
    return len(get_engine(pipe).branches)


PIPES = {"dit": dit_pipe, "pixart": pixart_pipe}


@pytest.fixture(scope="module", params=sorted(PIPES))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def ref(kind):
    return run(PIPES[kind]())


def cached(kind, config):
    return apply_cache(PIPES[kind](), config)


# -- exactness identities through the pipelines ---------------------------------------------
def test_branches_per_block(kind):
    pipe = cached(kind, FORAConfig())
    names = [b.name for b in get_engine(pipe).branches]
    per_block = ["attn1", "attn2", "ff"] if kind == "pixart" else ["attn1", "ff"]
    assert names == [f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block]


def test_all_full_is_bit_exact(kind, ref):
    assert torch.equal(run(cached(kind, FORAConfig(period=1))), ref)
    n = 6 if kind == "pixart" else 4
    assert torch.equal(run(cached(kind, ICCConfig(schedule=np.ones((STEPS, n), bool), rank=3))), ref)
    assert torch.equal(run(cached(kind, NoCacheConfig())), ref)


def test_fora_caches_and_icc_full_rank_is_exact(kind, ref):
    fora = run(cached(kind, FORAConfig(period=2)))
    assert rel(fora, ref) > 1e-3
    assert rel(run(cached(kind, ICCConfig(period=2, rank="full"))), ref) < 1e-5
    assert rel(run(cached(kind, ForecastConfig(period=3, rank="full"))), ref) < 1e-5
    icc0 = run(cached(kind, ICCConfig(period=2, rank=0)))
    assert torch.equal(icc0, fora)
    assert torch.equal(run(cached(kind, GOCConfig(period=2, weight=0.0, steps=[3, 5]))), fora)
    icc = run(cached(kind, ICCConfig(period=2, rank=4)))
    assert rel(icc, ref) < rel(fora, ref)


def test_calls_in_a_row_and_other_sizes(kind):
    config = ICCConfig(period=2, rank=4)
    pipe = cached(kind, config)
    a, b = run(pipe), run(pipe)
    assert torch.equal(a, b)
    c = run(pipe, steps=5, batch=3, seed=1)
    assert get_engine(pipe).stats()["calls"] == 5
    assert torch.equal(c, run(cached(kind, config), steps=5, batch=3, seed=1))
    assert torch.equal(run(pipe), a)


def test_remove_cache_restores_the_pipeline(kind, ref):
    pipe = PIPES[kind]()
    cls = type(pipe)
    apply_cache(pipe, ICCConfig(period=2, rank=4))
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    with pytest.raises(ValueError, match="remove_cache"):
        apply_cache(pipe, FORAConfig())
    run(pipe)
    assert remove_cache(pipe) is pipe
    assert type(pipe) is cls
    assert not any(k.startswith("_calicache") for k in vars(pipe))
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run(pipe), ref)
    apply_cache(pipe, FORAConfig(period=2))  # attachable again
    assert rel(run(pipe), ref) > 1e-3


def test_run_length_comes_from_the_pipeline(kind):
    n = layers(cached(kind, FORAConfig()))
    gather = np.ones((STEPS, n), bool)
    gather[1::2, ::2] = False
    pipe = cached(kind, FORAConfig(schedule=gather))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    run(pipe)
    with pytest.raises(ValueError, match=f"schedule has {STEPS} calls but this run makes 5"):
        run(pipe, steps=5)
    assert len(calls) == STEPS  # the short run failed before any model call
    # GOC needs the run length: the published steps for 20 calls, or an error naming the fix.
    goc = cached(kind, GOCConfig(period=2))
    with pytest.raises(ValueError, match="20-call runs"):
        run(goc)
    out20 = run(goc, steps=20)
    assert rel(out20, run(cached(kind, FORAConfig(period=2)), steps=20)) > 1e-4


def test_failed_call_then_good_call(kind, ref):
    pipe = cached(kind, FORAConfig(period=1))
    blk = pipe.transformer.transformer_blocks[0].norm1
    calls = {"n": 0}

    def flaky(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    h = blk.register_forward_pre_hook(flaky)
    with pytest.raises(RuntimeError, match="boom"):
        run(pipe)
    h.remove()
    assert not get_engine(pipe).explicit and "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run(pipe), ref)


def test_inference_mode_and_cache_run(kind, ref):
    pipe = cached(kind, FORAConfig(period=2))
    own = run(pipe)
    assert rel(own, ref) > 1e-4  # the cache served calls
    with torch.inference_mode():
        assert torch.equal(run(pipe), own)
    with cache_run(pipe, 2 * STEPS):  # the caller's own run boundary is respected: two pipeline calls, one run
        assert torch.equal(run(pipe), own)
        assert get_engine(pipe).explicit and get_engine(pipe).stats()["calls"] == STEPS
        run(pipe)
        assert get_engine(pipe).stats()["calls"] == 2 * STEPS
    assert not get_engine(pipe).explicit


# -- prompt-constant cross-attention K/V --------------------------------------------------------
def test_cross_attention_kv_once_per_run(monkeypatch):
    pipe = cached("pixart", ICCConfig(period=2, rank=4))
    blocks = pipe.transformer.transformer_blocks
    kv = [b.attn2.to_k.weight for b in blocks] + [b.attn2.to_v.weight for b in blocks]
    q = blocks[0].attn2.to_q.weight
    cap = pipe.transformer.caption_projection.linear_1.weight
    counts = count_linear(monkeypatch, kv + [q, cap])
    a = run(pipe, prompt_seed=0)
    assert all(counts[id(w)] == 1 for w in kv) and counts[id(cap)] == 1
    assert counts[id(q)] == STEPS // 2  # full calls only; cached calls use the low-rank correction
    b = run(pipe, prompt_seed=1)  # a new prompt: recomputed, and equal to a fresh pipeline's output
    assert all(counts[id(w)] == 2 for w in kv)
    assert rel(a, b) > 1e-3
    assert torch.equal(b, run(cached("pixart", ICCConfig(period=2, rank=4)), prompt_seed=1))
    # method "none" is the plain model: K/V at every call
    plain = pixart_pipe()
    counts = count_linear(monkeypatch, [plain.transformer.transformer_blocks[0].attn2.to_k.weight])
    run(plain)
    assert list(counts.values()) == [STEPS]


def test_new_prompt_inside_a_run_meets_no_stale_keys(monkeypatch):
    """A bare transformer in an outside loop: the prompt changes between two calls of one run."""
    model = tiny_pixart()
    ref_model = copy.deepcopy(model)
    apply_cache(model, FORAConfig(period=1))
    counts = count_linear(monkeypatch, [model.transformer_blocks[1].attn2.to_k.weight])
    x = torch.randn(2, 4, 8, 8)
    p, q = prompts(2, 0)["prompt_embeds"], prompts(2, 1)["prompt_embeds"]
    with torch.no_grad():
        for t, text in [(900, p), (800, p), (700, q), (600, q.clone())]:  # equal values, other object
            kw = dict(timestep=torch.full((2,), t), encoder_hidden_states=text, return_dict=False)
            assert torch.equal(model(x, **kw)[0], ref_model(x, **kw)[0])
        assert list(counts.values()) == [2]
        q.add_(1.0)  # the same object changed in place: its version counter tells
        kw = dict(timestep=torch.full((2,), 500), encoder_hidden_states=q, return_dict=False)
        assert torch.equal(model(x, **kw)[0], ref_model(x, **kw)[0])
    assert list(counts.values()) == [3]


# -- our DiT and its diffusers conversion, cached alike -------------------------------------------
@pytest.mark.parametrize("config", [
    dict(method="fora", period=2),
    dict(method="icc", period=2, rank=3),
    dict(method="goc", period=2, steps=[3, 5]),
    dict(method="forecast", period=3, rank=3),
])
def test_our_dit_and_diffusers_conversion_cache_alike(config):
    from calicache.models.convert import to_diffusers

    ours = tiny_model(seed=5, num_classes=1000, in_channels=4)
    theirs = to_diffusers(ours)
    uncached = copy.deepcopy(ours)
    apply_cache(ours, config_from_dict(config))
    apply_cache(theirs, config_from_dict(config))
    assert len(get_engine(theirs).branches) == len(get_engine(ours).branches) == 4
    schedule = Schedule.create(STEPS, "adm")
    y = torch.tensor([0, 7, 999])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def sample(model, fn):
        with torch.inference_mode(), cache_run(model, STEPS):
            return ddim(guided_model_fn(fn, y, 1000, 2.0), x.clone(), schedule)

    a = sample(ours, ours)
    b = sample(theirs, lambda x, t, y: theirs(x, timestep=t, class_labels=y).sample)
    assert rel(b, a) < 1e-5
    assert rel(a, sample(uncached, uncached)) > 1e-3  # the cache really served calls


# -- MACs ---------------------------------------------------------------------------------------
def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """SDPA as two matmuls: torch's flop counter misses the fused CPU attention kernel."""
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        s = s + attn_mask
    return torch.softmax(s, dim=-1) @ v


MODELS = {
    "dit": lambda: tiny_dit(),
    "pixart": lambda: tiny_pixart(),
    "pixart-micro": lambda: tiny_pixart(use_additional_conditions=True),  # resolution/aspect embedders
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("config", [
    NoCacheConfig(),
    FORAConfig(period=2),
    ICCConfig(period=2, rank=3),
    ICCConfig(period=3, rank="full"),
])
def test_per_call_macs_match_flop_counter(name, config, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    model = apply_cache(MODELS[name](), config)
    steps, batch = 6, 3
    pixart = name.startswith("pixart")
    expected = count_macs(model, None, steps, text_tokens=TEXT_TOKENS if pixart else None)
    x = torch.randn(batch, 4, 8, 8)
    kw = {}
    if pixart:
        kw = dict(encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, CAPTION),
                  encoder_attention_mask=torch.ones(batch, TEXT_TOKENS))
        if name == "pixart-micro":
            kw["added_cond_kwargs"] = dict(resolution=torch.tensor([[64.0, 64.0]] * batch),
                                           aspect_ratio=torch.tensor([[1.0]] * batch))
    else:
        kw = dict(class_labels=torch.tensor([0, 1, 2]))
    counted = []
    with torch.inference_mode():
        for t in reversed(Schedule.create(steps).timesteps):
            with FlopCounterMode(display=False) as fc:
                model(x, timestep=torch.full((batch,), int(t)), **kw)
            counted.append(fc.get_total_flops() // 2 // batch)
    assert counted == expected["per_call"]


def test_macs_of_pipelines_and_shapes():
    pipe = pixart_pipe()
    plain = count_macs(pipe, NoCacheConfig(), 10)
    fora = count_macs(pipe, FORAConfig(period=2), 10)
    m = pipe.transformer
    c, t, n, d = 24, 120, 16, 2
    kv = d * t * 2 * c * c + t * (CAPTION * c + c * c)  # cross-attention K/V of every block, caption projection
    assert plain["per_call"][0] == plain["per_call"][1] == plain["full_call"]
    assert fora["per_call"][0] == plain["full_call"]
    full_branches = d * (n * 4 * c * c + 2 * n * n * c + n * c * c + n * c * c + 2 * n * t * c + n * 8 * c * c)
    assert fora["per_call"][1] == plain["full_call"] - kv - full_branches
    bigger = count_macs(pipe, NoCacheConfig(), 10, tokens=4 * n, text_tokens=300)
    assert bigger["full_call"] > plain["full_call"]
    # a model with a cache attached, counted under another config: the hooks stay as they were
    apply_cache(pipe, FORAConfig(period=2))
    assert count_macs(pipe, NoCacheConfig(), 10) == plain
    assert count_macs(pipe, None, 10) == fora
    assert count_macs(m, None, 10, text_tokens=120) == fora
    assert get_engine(pipe) is get_engine(m) and "forward" in vars(m)


# -- refusals -----------------------------------------------------------------------------------
def test_unsupported_variants_are_clear_errors():
    m = tiny_pixart()
    m.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_cache(m, FORAConfig())
    m = tiny_dit()
    m.transformer_blocks[1].set_chunk_feed_forward(2)
    with pytest.raises(ValueError, match="set_chunk_feed_forward"):
        apply_cache(m, FORAConfig())
    assert not any("forward" in vars(x) for x in m.modules())
    with pytest.raises(ValueError, match="without a timestep"):
        apply_cache(tiny_dit(), FORAConfig())(torch.randn(1, 4, 8, 8), class_labels=torch.tensor([0]))
    pipe = apply_cache(dit_pipe(), FORAConfig())
    pipe.transformer = tiny_dit(1)
    with pytest.raises(RuntimeError, match="replaced"):
        run(pipe)


# -- CLI: calicache sample --pipeline, calicache macs --pipeline ------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    pixart_pipe().save_pretrained(root / "pixart")  # tokenizer and text encoder None: embeddings only
    dit_pipe().save_pretrained(root / "dit")
    p = prompts(2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in p.items() if v is not None}, str(root / "embeds.safetensors"))
    torch.save({k: p[k] for k in ("prompt_embeds", "prompt_attention_mask")}, root / "cond-only.pt")
    return root


def test_cli_samples_through_pipelines(folders, tmp_path, capsys):
    import json

    out = tmp_path / "pix"
    assert cli("sample", "--pipeline", folders / "pixart", "--prompt-embeds", folders / "embeds.safetensors",
               "--num", 3, "--steps", 4, "--method", "fora", "--period", 2, "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline_class"] == "PixArtAlphaPipeline" and report["scheduler"] == "DPMSolverMultistepScheduler"
    assert report["model_calls_per_batch"] == 4 and report["cached_ratio"] == 0.5
    assert (report["tokens"], report["text_tokens"], report["cfg_scale"]) == (16, TEXT_TOKENS, 4.5)
    expected = count_macs(pixart_pipe(), FORAConfig(period=2), 4, 4.5, text_tokens=TEXT_TOKENS)
    assert report["macs"] == expected and report["cache_bytes"] > 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 0]
        first = f["arr_0"]
    assert (out / "grid.png").is_file() and json.loads((out / "report.json").read_text()) == report

    assert cli("sample", "--pipeline", folders / "pixart", "--prompt-embeds", folders / "embeds.safetensors",
               "--num", 3, "--steps", 4, "--scheduler", "ddim", "--out", tmp_path / "ddim", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheduler"] == "DDIMScheduler" and report["macs"]["speedup"] == 1.0
    with np.load(tmp_path / "ddim" / "samples.npz") as f:
        assert not np.array_equal(f["arr_0"], first)

    assert cli("sample", "--pipeline", folders / "dit", "--classes", "3,5", "--num", 2, "--steps", 4,
               "--method", "icc", "--rank", 2, "--batch-size", 1, "--out", tmp_path / "dit", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline_class"] == "DiTPipeline" and report["classes"] == [3, 5] and report["macs"]["speedup"] > 1
    with np.load(tmp_path / "dit" / "samples.npz") as f:
        assert f["arr_1"].tolist() == [3, 5]


def test_cli_pipeline_errors(folders, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--pipeline", folders / "pixart", "--prompt", "a cat"], "no text encoder"),
        (["--pipeline", folders / "pixart", "--prompt-embeds", folders / "cond-only.pt"], "negative_prompt_embeds"),
        (["--pipeline", folders / "pixart", "--prompt-embeds", tmp_path / "missing.pt"], "no such file"),
        (["--pipeline", folders / "pixart"], "needs --prompt"),
        (["--pipeline", folders / "dit", "--prompt-embeds", folders / "embeds.safetensors"], "class-conditional"),
        (["--prompt", "a cat"], "need --pipeline"),
        (["--pipeline", tmp_path], "model_index.json"),
    ]
    for argv, match in cases:
        assert cli("sample", *argv, "--steps", 2, "--out", out) == 2
        assert match in capsys.readouterr().err
    assert not out.exists()
    # without guidance the conditional embeddings alone are enough
    assert cli("sample", "--pipeline", folders / "pixart", "--prompt-embeds", folders / "cond-only.pt",
               "--cfg-scale", 1, "--steps", 2, "--num", 1, "--out", out) == 0


def test_cli_macs_of_diffusers_folders(folders, capsys):
    import json

    for flag in ("--pipeline", "--model"):  # a PixArt folder cannot be a calicache DiT: --model counts it too
        assert cli("macs", flag, folders / "pixart", "--steps", 4, "--method", "icc", "--rank", 3,
                   "--text-tokens", TEXT_TOKENS, "--json") == 0
        got = json.loads(capsys.readouterr().out)
        assert got == count_macs(tiny_pixart(), ICCConfig(rank=3), 4, text_tokens=TEXT_TOKENS)
    assert cli("macs", "--pipeline", folders / "dit", "--steps", 4, "--json") == 0
    assert json.loads(capsys.readouterr().out) == count_macs(tiny_dit(), NoCacheConfig(), 4)
