"""FLUX, SD3, Wan and Qwen-Image transformers cached inside their diffusers pipelines (tiny random configs,
flow-matching schedulers, guidance as each pipeline does it): exactness identities, prompt constants once
per run, separate guidance passes, removal, and MACs against torch's flop counter."""

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
    count_macs,
    remove_cache,
)
from calicache.adapters import get_adapter
from calicache.cache import get_engine
from calicache.cache.pipeline import PIPE_ATTR
from calicache.calibration.text import calibrate_text
from conftest import cli, count_linear, rel

diffusers = pytest.importorskip("diffusers")
from tiny_families import (  # noqa: E402
    BATCH,
    PASSES,
    PIPES,
    POOLED,
    STEPS,
    TEXT,
    TOKENS,
    WIDTH,
    call_kwargs,
    flux,
    run,
    sd3,
    wan,
    with_vae,
)


@pytest.fixture(scope="module", params=sorted(PIPES))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def ref(kind):
    return run(PIPES[kind](), kind)


def cached(kind: str, config):
    return apply_cache(PIPES[kind](), config)


# -- exactness identities through the pipelines ---------------------------------------------------
def test_exactness_identities(kind, ref):
    layers = len(get_engine(cached(kind, FORAConfig())).branches)
    assert torch.equal(run(cached(kind, FORAConfig(period=1)), kind), ref)
    assert torch.equal(run(cached(kind, ICCConfig(schedule=np.ones((STEPS, layers), bool), rank=3)), kind),
                       ref)
    fora = run(cached(kind, FORAConfig(period=2)), kind)
    assert rel(fora, ref) > 1e-4  # the cache really served calls
    assert rel(run(cached(kind, ICCConfig(period=2, rank="full")), kind), ref) < 1e-5
    for units in ("calls", "timesteps"):  # flow-matching timesteps are floats; distances are their ratios
        config = ForecastConfig(period=3, rank="full", units=units)
        assert rel(run(cached(kind, config), kind), ref) < 1e-5
    assert torch.equal(run(cached(kind, ICCConfig(period=2, rank=0)), kind), fora)
    assert torch.equal(run(cached(kind, GOCConfig(period=2, weight=0.0, steps=[3])), kind), fora)
    goc = run(cached(kind, GOCConfig(period=2, steps=[3])), kind)
    assert rel(goc, fora) > 1e-6


def test_each_guidance_pass_is_one_run_with_its_own_cache(kind):
    pipe = cached(kind, FORAConfig(period=2))
    a = run(pipe, kind)
    twins = vars(pipe)[PIPE_ATTR][2].twins
    assert len(twins) == PASSES[kind] - 1
    for model in [pipe.transformer] + twins:
        assert get_engine(model).stats()["calls"] == STEPS
    assert torch.equal(run(pipe, kind), a)  # a second call of the pipeline is a fresh run
    if PASSES[kind] > 1:
        # The twin: other module objects (own hooks and cache), the very same weights.
        assert not any(a is b for a, b in zip(twins[0].modules(), pipe.transformer.modules()))
        assert all(p is q for p, q in zip(twins[0].parameters(), pipe.transformer.parameters()))


def test_remove_cache_restores_the_pipeline(kind, ref):
    pipe = PIPES[kind]()
    cls = type(pipe)
    apply_cache(pipe, ICCConfig(period=2, rank=4))
    run(pipe, kind)
    twins = list(vars(pipe)[PIPE_ATTR][2].twins)
    remove_cache(pipe)
    assert type(pipe) is cls and not any(k.startswith("_calicache") for k in vars(pipe))
    assert not {"step", "set_timesteps"} & set(vars(pipe.scheduler))
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())
    assert all(get_engine(t)._patched == [] for t in twins)
    assert torch.equal(run(pipe, kind), ref)


# -- prompt-only work once per run ---------------------------------------------------------------
def constant_weights(kind: str, model) -> list:
    if kind in ("flux", "sd3"):
        return [model.context_embedder.weight]
    if kind == "wan":
        blocks = model.blocks
        return ([model.condition_embedder.text_embedder.linear_1.weight] + [b.attn2.to_k.weight for b in blocks]
                + [b.attn2.to_v.weight for b in blocks])
    return [model.txt_in.weight]


def test_prompt_constants_once_per_run_and_pass(kind, monkeypatch):
    pipe = cached(kind, ICCConfig(period=2, rank=4))
    counts = count_linear(monkeypatch, constant_weights(kind, pipe.transformer))
    a = run(pipe, kind)
    assert set(counts.values()) == {PASSES[kind]}
    b = run(pipe, kind, prompt_seed=1)  # a new prompt: recomputed, equal to a fresh pipeline's result
    assert set(counts.values()) == {2 * PASSES[kind]}
    assert rel(a, b) > 1e-3
    monkeypatch.undo()
    assert torch.equal(b, run(cached(kind, ICCConfig(period=2, rank=4)), kind, prompt_seed=1))


# -- MACs ----------------------------------------------------------------------------------------
def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    """SDPA as two matmuls: torch's flop counter misses the fused CPU attention kernel."""
    s = query @ key.transpose(-2, -1) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ value


def first_call(kind: str) -> tuple[tuple, dict]:
    """The arguments of the transformer's first call inside its pipeline."""
    pipe = PIPES[kind]()
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    run(pipe, kind, steps=1)
    return seen[0]


@pytest.mark.parametrize("config", [NoCacheConfig(), FORAConfig(period=2),
                                    ICCConfig(period=2, rank=3), ICCConfig(period=3, rank="full"),
                                    GOCConfig(period=2, steps=[3])])
def test_per_call_macs_match_flop_counter(kind, config, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    args, kwargs = first_call(kind)
    model = apply_cache(PIPES[kind]().transformer, config)
    expected = count_macs(model, None, STEPS, tokens=TOKENS[kind], text_tokens=TEXT)
    batch = kwargs["hidden_states"].shape[0]
    t0 = kwargs["timestep"]
    counted = []
    with torch.inference_mode():
        for s in range(STEPS):
            kw = dict(kwargs, timestep=t0 * (1 - s / STEPS))
            with FlopCounterMode(display=False) as fc:
                model(*args, **kw)
            counted.append(fc.get_total_flops() // 2 // batch)
    if config.method == "goc":
        # GOC's update at a compensated call (one subtract and one multiply-add per element of each cached
        # branch output, both streams of joint attention) is element-wise: our convention counts it as one MAC
        # per element, the flop counter counts matmuls only.
        branches = get_adapter(model, TOKENS[kind], TEXT).branches(model)
        update = sum(b.output_elements() for b in branches)  # call 3: every branch cached
        assert update > 0
        counted[3] += update
    assert counted == expected["per_call"]


# -- refusals ------------------------------------------------------------------------------------
def test_wan22_second_expert_is_a_clear_error():
    pipe = wan()
    pipe = type(pipe)(**{**pipe.components, "transformer_2": wan(1).transformer}, boundary_ratio=0.5)
    with pytest.raises(ValueError, match="transformer_2"):
        apply_cache(pipe, FORAConfig())
    assert get_engine(pipe) is None and get_engine(pipe.transformer) is None
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())


def test_fused_projections_are_a_clear_error():
    pipe = sd3()
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_cache(pipe, FORAConfig())
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())


# -- calibration from each family's prompt-embedding format ---------------------------------------
def embeds_and_size(kind: str) -> tuple[dict, dict]:
    kw = call_kwargs(kind)
    size = {k: v for k, v in kw.items() if k in ("height", "width", "num_frames", "guidance_scale")
            and not (k == "guidance_scale" and PASSES[kind] > 1 or kind == "sd3")}
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}, size


def test_ca_and_cd_calibration_through_the_pipeline(kind, ref):
    embeds, size = embeds_and_size(kind)
    pipe = PIPES[kind]()
    cd = calibrate_text(pipe, embeds, svd="cd", rank="full", steps=3, pipeline_kwargs=size)
    assert cd.meta["svd"] == "cd" and cd.meta["sampler"] == "FlowMatchEulerDiscreteScheduler"
    # full-rank scaled-SVD factors reproduce every weight: ICC stays exact with them
    out = run(cached(kind, ICCConfig(period=2, svd="cd", factors=cd, rank="full")), kind)
    assert rel(out, ref) < 1e-5
    latents = run(PIPES[kind](), kind, steps=2)  # clean latents in the layout the pipeline's `latents` takes
    ca = calibrate_text(pipe, embeds, latents=latents, svd="ca", rank=3, steps=3, pipeline_kwargs=size)
    plain = calibrate_text(pipe, svd="plain", rank=3)
    name = get_engine(cached(kind, FORAConfig())).branches[0].linears[0].name
    assert not torch.allclose(ca.tensors[name][0], plain.tensors[name][0])  # the statistics scale the SVD
    icc = run(cached(kind, ICCConfig(period=2, svd="ca", factors=ca, rank=3)), kind)
    assert 0 < rel(icc, ref) < 0.5
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())  # calibration hooks are gone


def test_calibration_errors():
    embeds, size = embeds_and_size("flux")
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        calibrate_text(flux(), {"prompt_embeds": embeds["prompt_embeds"]}, svd="cd", steps=2)
    with pytest.raises(ValueError, match="separate passes"):
        w_embeds, w_size = embeds_and_size("wan")
        calibrate_text(wan(), w_embeds, svd="cd", steps=2, cfg_scale=5.0, pipeline_kwargs=w_size)
    with pytest.raises(ValueError, match="layout"):
        calibrate_text(flux(), embeds, latents=torch.randn(BATCH, 4, 8, 8), svd="ca", steps=2, pipeline_kwargs=size)
    with pytest.raises(ValueError, match="layout"):  # no tokens: a size the VAE's scale factor rounds to nothing
        calibrate_text(flux(), embeds, latents=torch.randn(BATCH, 0, 64), svd="ca", steps=2, pipeline_kwargs=size)


# -- CLI: calicache sample --pipeline / calibrate --pipeline ---------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("family-pipes")
    for kind in PIPES:
        with_vae(kind).save_pretrained(root / kind)  # no text encoders: embeddings only
        save_file({k: v.clone().contiguous() for k, v in call_kwargs(kind).items() if isinstance(v, torch.Tensor)},
                  str(root / f"{kind}.safetensors"))
    return root


def test_cli_calibrates_and_samples_every_family(kind, folders, tmp_path, capsys):
    import json

    size = ["--height", 16 if kind == "wan" else 8, "--width", 16 if kind == "wan" else 8]
    size += ["--num-frames", 5] if kind == "wan" else []
    common = ["--pipeline", folders / kind, "--prompt-embeds", folders / f"{kind}.safetensors", "--steps", 3, *size]
    factors = tmp_path / "cd.safetensors"
    assert cli("calibrate", *common, "--svd", "cd", "--rank", 2, "--out", factors, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["svd"] == "cd" and report["rank_max"] == 2 and 0 < report["calibrated_call_share"] < 1
    out = tmp_path / "icc"
    assert cli("sample", *common, "--num", 3, "--method", "icc", "--svd", "cd", "--factors", factors,
               "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline_class"] == type(PIPES[kind]()).__name__
    assert report["model_calls_per_batch"] == 3 and report["macs"]["speedup"] > 1
    assert report["text_tokens"] == TEXT and report["cache_bytes"] > 0
    with np.load(out / "samples.npz") as f:
        frames = report["frames_per_video"] or 1
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape[0] == 3 * frames and f["arr_0"].shape[-1] == 3
        assert f["arr_1"].tolist() == [i for i in (0, 1, 0) for _ in range(frames)]


def test_cli_family_errors(folders, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["sample", "--pipeline", folders / "flux", "--prompt", "a cat"], "no text encoder"),
        (["sample", "--pipeline", folders / "sd3", "--prompt-embeds", folders / "wan.safetensors"],
         "pooled_prompt_embeds"),
        (["sample", "--pipeline", folders / "sd3", "--prompt-embeds", folders / "sd3.safetensors", "--scheduler",
          "ddim"], "flow-matching"),
        (["sample", "--pipeline", folders / "sd3", "--prompt-embeds", folders / "sd3.safetensors", "--num-frames", 5],
         "--num-frames applies to Wan"),
        (["calibrate", "--pipeline", folders / "wan", "--prompt-embeds", folders / "wan.safetensors", "--svd", "cd",
          "--cfg-scale", 5, "--num-frames", 5], "separate passes"),
    ]
    for argv, match in cases:
        assert cli(*argv, "--steps", 2, "--out", out) == 2
        assert match in capsys.readouterr().err
    assert not out.exists()


# -- cache-dit's static cache against calicache's FORA -------------------------------------------------
def constant_gates(pipe):
    """Zero the modulation linears' weights (biases stay): gates no longer depend on the timestep. Then caching
    each branch before its gate (calicache) and caching the residual of a run of blocks (cache-dit) coincide."""
    with torch.no_grad():
        for name, m in pipe.transformer.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "img_mod.1", "txt_mod.1",
                              "condition_embedder.time_proj")):
                m.weight.zero_()
    return pipe


def test_cache_dit_static_cache_equals_fora(kind):
    """cache-dit's DBCache with a static step mask computes block 0 (Fn = 1) at every step and serves the
    residual of all later blocks at masked steps; calicache's FORA with the same gather matrix (block 0 full)
    gives the same result when the gates are constant, also under Wan's separate guidance passes."""
    cache_dit = pytest.importorskip("cache_dit")
    mask = [1, 0, 1, 0, 1]
    ref = run(constant_gates(PIPES[kind]()), kind)
    theirs = constant_gates(PIPES[kind]())
    try:
        cache_dit.enable_cache(theirs, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, steps_computation_mask=mask,
            steps_computation_policy="static", num_inference_steps=STEPS, residual_diff_threshold=0.0))
    except Exception as e:  # a cache-dit version without this pipeline or these options
        pytest.skip(f"cache-dit cannot cache this tiny {kind} pipeline: {e}")
    try:
        a = run(theirs, kind)
    finally:
        cache_dit.disable_cache(theirs)  # it patches the pipeline class's __call__ while enabled
    names = [b.name for b in get_engine(cached(kind, FORAConfig())).branches]
    gather = np.ones((STEPS, len(names)), bool)
    for s, m in enumerate(mask):
        if not m:
            gather[s] = [n.startswith(("transformer_blocks.0.", "blocks.0.")) for n in names]
    b = run(apply_cache(constant_gates(PIPES[kind]()), FORAConfig(schedule=gather)), kind)
    assert rel(b, ref) > 1e-3  # both really cached
    assert rel(a, b) < 1e-5


def test_cli_macs_of_family_folders(kind, folders, capsys):
    import json

    assert cli("macs", "--pipeline", folders / kind, "--steps", 4, "--method", "icc", "--rank", 2, "--tokens",
               TOKENS[kind], "--text-tokens", TEXT, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got == count_macs(PIPES[kind]().transformer, ICCConfig(rank=2), 4, tokens=TOKENS[kind],
                             text_tokens=TEXT)


@pytest.mark.parametrize("kind", ["flux", "wan"])  # packed (N, tokens, C) and video (N, C, F, H, W) latents
def test_cli_ca_calibration_from_latents(kind, folders, tmp_path, capsys):
    import json

    pipe = with_vae(kind)  # the folder's pipeline: its VAE sets the latent size
    size = {"height": 16, "width": 16, "num_frames": 5} if kind == "wan" else {"height": 8, "width": 8}
    kw = {**call_kwargs(kind), **size, "guidance_scale": 1.0}  # Wan without guidance: one pass
    out = pipe(**kw, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    torch.save({"latents": out.frames if kind == "wan" else out.images}, tmp_path / "latents.pt")
    flags = [f"--{k.replace('_', '-')}" if i % 2 == 0 else v for k, v in size.items() for i in range(2)]
    assert cli("calibrate", "--pipeline", folders / kind, "--prompt-embeds", folders / f"{kind}.safetensors",
               "--svd", "ca", "--latents", tmp_path / "latents.pt", "--rank", 2, "--steps", 3, *flags,
               "--out", tmp_path / "ca.safetensors", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["svd"] == "ca" and report["num"] == BATCH and report["data"].startswith(f"{BATCH} (latent")


@pytest.mark.parametrize("ours_first", [True, False])
def test_separate_passes_under_cpu_offload_hooks(ours_first):
    """accelerate's offload hooks (CPU as the device) around a pipeline whose guidance runs as two passes."""
    pytest.importorskip("accelerate")
    fora = run(cached("wan", FORAConfig(period=2)), "wan")
    pipe = wan()
    steps = [lambda: apply_cache(pipe, FORAConfig(period=2)), lambda: pipe.enable_model_cpu_offload(device="cpu")]
    for step in steps if ours_first else steps[::-1]:
        step()
    assert torch.equal(run(pipe, "wan"), fora)
    remove_cache(pipe)
    assert torch.equal(run(pipe, "wan"), run(wan(), "wan"))


def test_flux_schnell_macs_without_guidance_embedding(monkeypatch):
    """FLUX.1-schnell has no guidance embedder: its base MACs leave it out."""
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)).eval()
    apply_cache(model, ICCConfig(period=2, rank=3))
    n, t = 9, 4
    kw = dict(hidden_states=torch.randn(1, n, 16), encoder_hidden_states=torch.randn(1, t, 12),
              pooled_projections=torch.randn(1, 10), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(t, 3))
    counted = []
    with torch.inference_mode():
        for s in range(3):
            with FlopCounterMode(display=False) as fc:
                model(**kw, timestep=torch.tensor([1.0 - s / 3]))
            counted.append(fc.get_total_flops() // 2)
    assert counted == count_macs(model, None, 3, tokens=n, text_tokens=t)["per_call"]


def test_caller_run_routes_guidance_passes_like_a_pipeline_run(kind):
    """Inside the caller's own `cache_run(pipe, n)` each guidance pass still meets its own cache."""
    from calicache.cache import cache_run

    pipe = cached(kind, FORAConfig(period=2))
    own = run(pipe, kind)
    with cache_run(pipe, STEPS):
        assert torch.equal(run(pipe, kind), own)
    for model in [pipe.transformer] + vars(pipe)[PIPE_ATTR][2].twins:
        assert get_engine(model).stats()["calls"] == STEPS


def test_guidance_twin_under_offload_copies_no_weights():
    """The twin of an offloaded transformer shares every parameter; accelerate's hook chain (which leads to the
    text encoder) is not copied with it."""
    import gc
    import types

    pytest.importorskip("accelerate")
    pipe = wan()
    class Encoder(torch.nn.Linear):  # stands in for UMT5: earlier in the offload chain
        dtype = property(lambda self: self.weight.dtype)

    pipe.register_modules(text_encoder=Encoder(4, 4))
    pipe.enable_model_cpu_offload(device="cpu")
    apply_cache(pipe, FORAConfig(period=2))
    run(pipe, "wan")
    (twin,) = vars(pipe)[PIPE_ATTR][2].twins
    known = {id(p) for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()}
    skip = (type, str, bytes, types.ModuleType, types.FunctionType)  # not through globals: objects only
    seen, todo, copied = set(), [twin], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip) or obj is pipe or obj is get_engine(pipe):
            continue
        seen.add(id(obj))
        if type(obj) is torch.nn.Parameter:
            if id(obj) not in known:
                copied.append(obj.shape)
            continue
        todo.extend(gc.get_referents(obj))
    assert copied == []


def test_summary_counts_every_guidance_pass(kind):
    import calicache

    pipe = cached(kind, FORAConfig(period=2))
    run(pipe, kind)
    engines = [get_engine(pipe)] + [get_engine(t) for t in vars(pipe)[PIPE_ATTR][2].twins]
    s = calicache.summary(pipe)
    assert s["passes"] == PASSES[kind] == len(engines)
    assert s["cache_bytes"] == sum(e.peak_cache_bytes for e in engines) > 0
    assert ("2 guidance passes" in str(s)) == (PASSES[kind] == 2)


def test_sd3_skip_layer_guidance_is_refused_before_any_model_call():
    """Its extra transformer call comes at some steps only, with blocks skipped: no pass of one call per timestep
    fits it, so a twin would number its calls off the timesteps."""
    pipe = cached("sd3", FORAConfig(period=2))
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=r"skip_guidance_layers=\.\.\.\): skip-layer guidance is not supported.*"
                                         r"remove_cache\(pipe\)"):
        pipe(**call_kwargs("sd3"), num_inference_steps=STEPS, output_type="latent", skip_guidance_layers=[1],
             skip_layer_guidance_stop=0.9)
    handle.remove()
    assert calls == [] and not vars(pipe)[PIPE_ATTR][2].twins
    assert torch.equal(run(pipe, "sd3"), run(cached("sd3", FORAConfig(period=2)), "sd3"))  # the cache is as it was
    remove_cache(pipe)


def test_bare_sd3_transformer_refuses_skip_layers_and_keeps_its_run():
    """Skip-layer guidance's pass on a bare transformer (someone else's loop): refused before the call, with a
    clear fix; the run goes on as if that call had not been made."""
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, TEXT, WIDTH, generator=g),
              pooled_projections=torch.randn(1, POOLED, generator=g))
    first, second = torch.tensor([900.0]), torch.tensor([600.0])
    plain, refused = (apply_cache(sd3().transformer, FORAConfig(period=2)) for _ in range(2))
    with torch.inference_mode():
        plain(**kw, timestep=first)
        expected = plain(**kw, timestep=second).sample
        refused(**kw, timestep=first)
        with pytest.raises(ValueError, match=r"skip_layers=\.\.\.\): skipping blocks is not supported.*"
                                             r"call without skip_layers, or remove_cache\(transformer\)"):
            refused(**kw, timestep=second, skip_layers=[1])
        assert get_engine(refused).call == 0
        assert torch.equal(refused(**kw, timestep=second, skip_layers=[]).sample, expected)  # skips nothing


def test_a_diffusers_cache_added_after_ours_is_refused_at_the_next_run():
    """Never double caching, in either order: a diffusers cache put on after calicache stops the next run."""
    from diffusers import FirstBlockCacheConfig

    pipe = flux()
    ref = run(pipe, "flux")
    apply_cache(pipe, FORAConfig(period=1))
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="already has a diffusers cache.*FirstBlockCache"):
        run(pipe, "flux")
    pipe.transformer.disable_cache()
    assert torch.equal(run(pipe, "flux"), ref)
    remove_cache(pipe)


def test_feed_forward_output_linear_reads_gelu_of_its_input_linear(kind):
    """A feed-forward's output linear takes GELU of its input linear's output (calibration statistics recompute
    that reference input instead of storing it)."""
    branches = get_engine(cached(kind, FORAConfig())).branches
    for b in branches:
        by_name = {s.name.split(".net.")[-1]: s for s in b.linears if ".net." in s.name}
        if "2" in by_name:
            assert by_name["2"].input_from == by_name["0.proj"].name and by_name["2"].input_fn is not None
    assert sum("net.2" in s.name for b in branches for s in b.linears) >= 2


def test_a_cache_replaced_on_the_transformer_is_a_clear_error():
    """remove_cache(pipe.transformer) and a new apply_cache on it leave the pipeline's routing on the old engine
    (its twins would cache the unconditional pass with the old config): the next call says so."""
    pipe = apply_cache(wan(), FORAConfig(period=2))
    remove_cache(pipe.transformer)
    apply_cache(pipe.transformer, FORAConfig(period=3))
    with pytest.raises(RuntimeError, match="remove_cache\\(pipe\\) and apply_cache\\(pipe, config\\) again"):
        run(pipe, "wan")
    remove_cache(pipe)
    remove_cache(pipe.transformer)
    assert torch.equal(run(apply_cache(pipe, FORAConfig(period=3)), "wan"),
                       run(cached("wan", FORAConfig(period=3)), "wan"))
