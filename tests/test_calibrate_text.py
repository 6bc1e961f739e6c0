"""ICC calibration of a text-to-image transformer (PixArt-alpha) from prompt embeddings: CA and CD statistics,
an independent recomputation of CD, exactness of the factors in the pipeline, bad inputs and the CLI."""

import json

import numpy as np
import pytest
import torch

import calicache
from calicache import FORAConfig, ICCConfig, apply_cache, calibrate_text, weight_hash
from calicache.adapters import get_adapter
from calicache.cache.factors import Factors
from calicache.cache.svd import scaled_svd
from calicache.calibration.calibrate import calibration_generator
from calicache.calibration.stats import finalise

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, PixArtAlphaPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import CAPTION, cli, pixart_pipe, prompts, rel, tiny_dit, tiny_pixart, tiny_vae  # noqa: E402
from conftest import pipe_latents as run  # noqa: E402

STEPS = 5
P = 6


def calib_prompts(n: int = P) -> dict:
    return prompts(n, seed=7)


def calib_latents(n: int = P) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def factors():
    pipe = pixart_pipe()
    out = {"plain": calibrate_text(pipe, svd="plain", rank="full")}
    out["ca"] = calibrate_text(pipe, calib_prompts(), latents=calib_latents(), svd="ca", rank="full", steps=STEPS,
                               batch_size=4)
    out["cd"] = calibrate_text(pipe, calib_prompts(), svd="cd", rank="full", steps=STEPS, batch_size=4)
    return out


@pytest.fixture(scope="module")
def ref():
    return run(pixart_pipe())


def linear_specs(transformer) -> list:
    return [s for b in get_adapter(transformer).branches(transformer) for s in b.linears]


def product(f: Factors, name: str, r: int) -> torch.Tensor:
    a, b = f.tensors[name]
    return a[:, :r] @ b[:r]


# -- the factors --------------------------------------------------------------------------------
def test_factors_are_finite_scaled_and_tied_to_the_transformer(factors):
    transformer = pixart_pipe().transformer
    specs = {s.name: s for s in linear_specs(transformer)}
    assert set(factors["cd"].tensors) == set(specs) and len(specs) == 16  # 2 blocks x (4 attn1, 2 attn2, 2 ff)
    for svd in ("ca", "cd"):
        f = factors[svd]
        assert f.meta["svd"] == svd and f.meta["model_hash"] == weight_hash(transformer)
        assert f.meta["num"] == P and f.meta["steps"] == STEPS and f.meta["sampler"] == "DPMSolverMultistepScheduler"
        moved = 0
        for name, (a, b) in f.tensors.items():
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            w = specs[name].weight().detach()
            assert torch.allclose(a @ b, w, atol=1e-4)  # full rank: the scaled SVD reproduces W
            moved += float((product(f, name, 2) - product(factors["plain"], name, 2)).norm() / w.norm()) > 1e-3
        assert moved == len(specs)  # every rank-2 truncation is a different fit than plain SVD's
    assert any(float((product(factors["ca"], n, 2) - product(factors["cd"], n, 2)).norm()) > 1e-4 for n in specs)


def test_full_rank_icc_equals_no_cache_and_rank_0_equals_fora(factors, ref, tmp_path):
    for svd in ("ca", "cd"):
        path = tmp_path / f"{svd}.safetensors"
        factors[svd].save(path)
        loaded = Factors.load(path)
        assert loaded.meta["svd"] == svd and loaded.meta["statistics"]
        full = run(apply_cache(pixart_pipe(), ICCConfig(period=2, rank="full", svd=svd, factors=path)))
        assert rel(full, ref) < 1e-5
        fora = run(apply_cache(pixart_pipe(), FORAConfig(period=2)))
        assert torch.equal(run(apply_cache(pixart_pipe(), ICCConfig(period=2, rank=0, factors=path))), fora)
    other = apply_cache(pixart_pipe(seed=1), FORAConfig())  # another transformer's weights
    calicache.remove_cache(other)
    with pytest.raises(ValueError, match="factor file was made for model"):
        apply_cache(other, ICCConfig(factors=tmp_path / "cd.safetensors"))


def test_statistics_do_not_depend_on_batch_size():
    pipe = pixart_pipe()
    for svd, data in (("cd", {}), ("ca", {"latents": calib_latents()})):
        a = calibrate_text(pipe, calib_prompts(), svd=svd, rank=3, steps=4, batch_size=2, **data)
        b = calibrate_text(pipe, calib_prompts(), svd=svd, rank=3, steps=4, batch_size=5, **data)
        for name in a.tensors:
            assert torch.allclose(product(a, name, 3), product(b, name, 3), atol=1e-5), (svd, name)
    c = calibrate_text(pipe, calib_prompts(), svd="cd", rank=3, steps=4, batch_size=2, seed=1)
    assert any(not torch.allclose(product(a, n, 3), product(c, n, 3), atol=1e-4) for n in a.tensors)


def recorded_cd_means(transformer, embeds: dict, gens: list, steps: int) -> dict:
    """The CD statistic computed from scratch: every linear's inputs and outputs recorded at every call of
    one pipeline run, then per sample and consecutive pair the min-max-normalised mean |difference|."""
    calls: dict[str, list] = {}

    def record(name):
        return lambda m, a, out: calls.setdefault(name, []).append((a[0].clone(), out.clone()))

    handles = [s.module.register_forward_hook(record(s.name)) for s in linear_specs(transformer)]
    runner = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=DDIMScheduler())
    runner.set_progress_bar_config(disable=True)
    try:
        runner(**embeds, negative_prompt=None, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
               output_type="latent", use_resolution_binning=False)
    finally:
        for h in handles:
            h.remove()
    means = {}
    for name, seq in calls.items():
        assert len(seq) == steps
        for side, k in (("in", 0), ("out", 1)):
            rows = []
            for j in range(1, steps):
                m = (seq[j][k] - seq[j - 1][k]).abs().mean(dim=1)  # (B, C): mean over tokens
                lo, hi = m.min(dim=1, keepdim=True).values, m.max(dim=1, keepdim=True).values
                rows.append((m - lo + 1e-6) / (hi - lo + 1e-6))
            means[(name, side)] = torch.cat(rows).double().mean(dim=0)
    return means


def test_cd_statistics_match_a_recomputation_from_recorded_activations():
    """One prompt, two runs (num=2): the factors equal the scaled SVD of scales computed independently, and
    under those scales CD's rank-r fit is at least as good as plain SVD's (best weighted fit, Eckart-Young)."""
    transformer = tiny_pixart()
    one = {k: v[:1] for k, v in calib_prompts().items() if v is not None}
    r = 3
    cd = calibrate_text(transformer, one, svd="cd", rank=r, num=2, steps=4, batch_size=2, scheduler=DDIMScheduler())
    plain = calibrate_text(transformer, svd="plain", rank=r)
    gens = [calibration_generator(0, 0), calibration_generator(0, 1)]
    means = recorded_cd_means(transformer, {k: v.expand(2, *v.shape[1:]) for k, v in one.items()}, gens, 4)
    modules = dict(transformer.named_modules())
    better = 0
    for name, (a, b) in cd.tensors.items():
        w = modules[name].weight.detach()
        si, so = finalise(means[(name, "in")]), finalise(means[(name, "out")])
        ea, eb = scaled_svd(w, r, si, so)
        assert torch.allclose(a @ b, ea @ eb, atol=1e-4), name
        e_cd, e_plain = (float((so[:, None] * (w - product(f, name, r)) * si[None]).norm()) for f in (cd, plain))
        assert e_cd <= e_plain * (1 + 1e-5), name
        better += e_cd < 0.99 * e_plain
    assert better >= len(cd.tensors) // 2


def test_images_with_a_vae_and_guided_statistics():
    pipe = pixart_pipe()
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    f = calibrate_text(pipe, calib_prompts(4), images=images, svd="ca", rank=2, steps=STEPS)  # the pipeline's VAE
    g = calibrate_text(pipe.transformer, calib_prompts(4), images=images, vae=tiny_vae(), svd="ca", rank=2,
                       steps=STEPS)
    for name in f.tensors:
        assert torch.allclose(product(f, name, 2), product(g, name, 2), atol=1e-5)
    guided = calibrate_text(pipe, calib_prompts(), svd="cd", rank=2, steps=STEPS, cfg_scale=4.5)
    conditional = calibrate_text(pipe, calib_prompts(), svd="cd", rank=2, steps=STEPS)
    assert guided.meta["cfg_scale"] == 4.5
    assert any(not torch.allclose(product(guided, n, 2), product(conditional, n, 2), atol=1e-4) for n in f.tensors)


def test_bad_inputs_are_clear_errors():
    pipe = pixart_pipe()
    cases = [
        (dict(prompt_embeds=None, svd="cd"), "needs prompt embeddings"),
        (dict(prompt_embeds={"prompt_embeds": torch.randn(2, 7, 5), "prompt_attention_mask": torch.ones(2, 7)}),
         f"must be \\(P, T, {CAPTION}\\)"),
        (dict(svd="ca"), "needs the clean latents"),
        (dict(svd="ca", latents=calib_latents(3)), "got 3 latents and 6 prompt embeddings"),
        (dict(svd="ca", latents=torch.randn(P, 3, 8, 8)), "\\(N, 4, H, W\\)"),
        (dict(svd="ca", latents=torch.full((P, 4, 8, 8), float("nan"))), "NaN"),
        (dict(svd="ca", latents=torch.randn(P, 4, 7, 7)), "multiples of the patch size"),
        (dict(svd="ca", images=np.zeros((P, 8, 8, 3), np.uint8)), None),  # the pipeline's VAE: fine
        (dict(svd="cd", latents=calib_latents()), "does not use them"),
        (dict(svd="cd", steps=1), "steps must be an integer >= 2"),
        (dict(svd="cd", cfg_scale=2.0, prompt_embeds={k: v for k, v in calib_prompts().items()
                                                      if k in ("prompt_embeds", "prompt_attention_mask")}),
         "negative_prompt_embeds"),
        (dict(svd="svd"), "unknown svd"),
        (dict(rank=-1), "rank must be"),
        (dict(num=0), "num must be"),
    ]
    for kw, match in cases:
        kw = {"prompt_embeds": calib_prompts(), "steps": 3, "rank": 2, **kw}
        if match is None:
            calibrate_text(pipe, **kw)
            continue
        with pytest.raises(ValueError, match=match):
            calibrate_text(pipe, **kw)
    with pytest.raises(ValueError, match="need a VAE"):
        calibrate_text(pipe.transformer, calib_prompts(), images=np.zeros((P, 8, 8, 3), np.uint8), svd="ca")
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        calibrate_text(tiny_dit(), calib_prompts())
    with pytest.raises(ValueError, match="calibrate_text"):
        calicache.calibrate(pipe.transformer, "fashion-mnist")
    cached = apply_cache(pixart_pipe(), FORAConfig())
    with pytest.raises(ValueError, match="remove_cache"):
        calibrate_text(cached, calib_prompts())
    with pytest.raises(FileNotFoundError, match="no such file"):
        calibrate_text(pipe, "missing.safetensors")


# -- CLI: calicache calibrate --pipeline / --model, then calicache sample --pipeline ------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = pixart_pipe()
    pipe.save_pretrained(root / "pixart")  # no tokenizer or text encoder in the folder
    pipe.transformer.save_pretrained(root / "transformer")
    p = calib_prompts()
    save_file({k: v.contiguous() for k, v in p.items() if v is not None}, str(root / "embeds.safetensors"))
    torch.save({"latents": calib_latents()}, root / "latents.pt")
    return root


def samples(folder, out, *extra):
    assert cli("sample", "--pipeline", folder / "pixart", "--prompt-embeds", folder / "embeds.safetensors",
               "--num", 3, "--steps", 4, "--out", out, *extra) == 0
    with np.load(out / "samples.npz") as f:
        return f["arr_0"].astype(int)


def test_cli_calibrates_a_pipeline_and_sample_uses_the_file(folders, tmp_path, capsys):
    out = tmp_path / "cd.safetensors"
    assert cli("calibrate", "--pipeline", folders / "pixart", "--prompt-embeds", folders / "embeds.safetensors",
               "--svd", "cd", "--rank", "full", "--steps", 4, "--batch-size", 4, "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    loaded = pixart_pipe().transformer
    assert report["svd"] == "cd" and report["num"] == P and report["steps"] == 4 and report["text_tokens"] == 7
    assert report["scheduler"] == "DPMSolverMultistepScheduler" and report["model_hash"] == weight_hash(loaded)
    assert Factors.load(out).meta["model_hash"] == weight_hash(loaded)
    plain = samples(folders, tmp_path / "none")
    icc = samples(folders, tmp_path / "icc", "--method", "icc", "--period", 2, "--factors", out, "--rank", "full")
    assert np.abs(icc - plain).max() <= 1  # the same images up to uint8 rounding
    capsys.readouterr()

    ca = tmp_path / "ca.safetensors"  # a transformer folder, CA on latents, DDIM
    assert cli("calibrate", "--model", folders / "transformer", "--prompt-embeds", folders / "embeds.safetensors",
               "--latents", folders / "latents.pt", "--svd", "ca", "--rank", 3, "--scheduler", "ddim", "--steps", 4,
               "--out", ca, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank_max"] == 3 and report["scheduler"] == "DDIMScheduler" and report["calibrated_call_share"] < 1
    assert Factors.load(ca).meta["model_hash"] == weight_hash(loaded)
    samples(folders, tmp_path / "ca-icc", "--method", "icc", "--svd", "ca", "--factors", ca, "--rank", 2)


def test_cli_errors_leave_no_file(folders, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    pix, emb = ["--pipeline", folders / "pixart"], ["--prompt-embeds", folders / "embeds.safetensors"]
    cases = [
        ([*pix, "--svd", "ca", *emb], "--latents FILE"),
        ([*pix, "--svd", "cd", *emb, "--latents", folders / "latents.pt"], "does not use them"),
        ([*pix, "--svd", "cd"], "needs --prompt-embeds"),
        ([*pix, *emb, "--sampler", "dpmpp_2m"], "--scheduler"),
        ([*pix, "--prompt-embeds", tmp_path / "missing.pt"], "no such file"),
        ([*pix, *emb, "--svd", "ca", "--latents", tmp_path / "missing.pt"], "no such file"),
        ([*pix, *emb, "--method", "goc"], "--method icc"),
        ([*pix, *emb, "--svd", "cf"], "not available for PixArt"),
        ([*pix, *emb, "--period", 3], "--period"),
        ([*emb], "give --pipeline"),
        (["--pipeline", tmp_path, *emb], "model_index.json"),
    ]
    for argv, match in cases:
        assert cli("calibrate", *argv, "--steps", 3, "--out", out) == 2, match
        assert match in capsys.readouterr().err
    assert not out.exists()
    # the plain factors need no data at all; a pipeline folder also works as --model
    assert cli("calibrate", "--model", folders / "pixart", "--svd", "plain", "--rank", 2, "--out", out) == 0
    assert Factors.load(out).meta["svd"] == "plain"


def test_cli_ca_on_images_encoded_by_the_pipelines_vae(folders, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (P, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images)
    out = tmp_path / "ca-images.safetensors"
    assert cli("calibrate", "--pipeline", folders / "pixart", "--prompt-embeds", folders / "embeds.safetensors",
               "--data", tmp_path / "images.npz", "--svd", "ca", "--rank", 2, "--steps", 4, "--out", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["images"] == str(tmp_path / "images.npz")
    api = calibrate_text(pixart_pipe(), calib_prompts(), images=images, svd="ca", rank=2, steps=4)
    for name, (a, b) in Factors.load(out).tensors.items():
        assert torch.allclose(a @ b, product(api, name, 2), atol=1e-5)
