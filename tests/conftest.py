"""Helpers the tests share: tiny models and pipelines, cached sampling, relative error, the CLI.

Import them with `from conftest import ...`; diffusers is imported only by the helpers that need it.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from calicache import apply_cache, remove_cache, sample
from calicache.cli import main
from calicache.models.dit import DiT, create_model

torch.set_num_threads(1)

PIPE_STEPS = 6  # scheduler steps of a tiny pipeline call
TEXT_TOKENS, CAPTION = 7, 12  # tiny PixArt prompts: tokens per prompt, caption (T5) width


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error |a - b| / |b| (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


def run_cached(model: nn.Module, config=None, steps: int = 8, num: int = 4, **kw) -> torch.Tensor:
    """`calicache.sample` with `config` applied (None: uncached); the model is left without a cache."""
    if config is not None:
        apply_cache(model, config)
    try:
        return sample(model, num, steps, **kw)
    finally:
        remove_cache(model)


def cli(*argv) -> int:
    """`calicache ARGV...` in this process (arguments may be paths or numbers); the exit status."""
    return main([str(a) for a in argv])


def cli_json(capsys, *argv) -> tuple[int, dict | str, str]:
    """(exit status, stdout parsed as JSON when the run succeeded with --json else the text, stderr)."""
    rc = cli(*argv)
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--json" in map(str, argv) else out), err


def randomize(model: DiT, seed: int = 0, std: float = 0.2) -> DiT:
    """Give the zero-initialised adaLN and final-layer weights non-zero values.

    A fresh DiT outputs exactly zero (adaLN-Zero), which would make every equality vacuous.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> DiT:
    """A tiny pixel-space DiT (2 blocks, width 32) with non-zero adaLN and output weights."""
    torch.manual_seed(seed)
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    cfg.update(overrides)
    return randomize(create_model("DiT-Tiny/2", **cfg), seed)


@pytest.fixture
def model() -> DiT:
    return tiny_model()


class TinyClassifier(nn.Module):
    """The interface of calicache.training.classifier's model: logits (N, 10) and features (N, D) of (N, 1, 28, 28)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12))
        self.head = nn.Linear(12, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * 5


@pytest.fixture
def calibrate_files(tmp_path):
    """(tmp_path, model): a tiny model saved as tmp_path/m.safetensors and 40 labelled 8x8 images as tmp_path/d.npz."""
    from calicache import save_model

    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 4, 40))
    return tmp_path, model


def calibrate_cli(tmp_path, *extra) -> int:
    """`calicache calibrate` on the files of `calibrate_files` (16 images, batch 8, 10 steps) and `extra` flags."""
    return cli("calibrate", "--model", tmp_path / "m.safetensors", "--data", tmp_path / "d.npz", "--num", 16,
               "--batch-size", 8, "--steps", 10, *extra)


def count_linear(monkeypatch, weights):
    """Counts F.linear calls per weight (what nn.Linear.forward computes), seen through every hook."""
    counts = {id(w): 0 for w in weights}
    linear = torch.nn.functional.linear

    def counting(x, w, b=None):
        if id(w) in counts:
            counts[id(w)] += 1
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return counts


# -- tiny diffusers pipelines (diffusers initialises nothing to zero, so outputs are non-trivial as built) --
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8).eval()


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()


def tiny_pixart(seed: int = 0, **kw):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, cross_attention_dim=24, caption_channels=CAPTION)
    cfg.update(kw)
    return PixArtTransformer2DModel(**cfg).eval()


def dit_pipe(seed: int = 0):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(seed), vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipe(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    # With prompt embeddings given, the pipeline runs neither tokenizer nor text encoder: both may be None.
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_pixart(seed),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts(n: int, seed: int = 0) -> dict:
    """Random prompt embeddings for a tiny PixArt pipeline (padded prompts, as T5 gives them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, TEXT_TOKENS, dtype=torch.long)
    mask[:, TEXT_TOKENS - 2:] = 0
    return dict(prompt_embeds=torch.randn(n, TEXT_TOKENS, CAPTION, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(n, TEXT_TOKENS, CAPTION, generator=g),
                negative_prompt_attention_mask=torch.ones(n, TEXT_TOKENS, dtype=torch.long), negative_prompt=None)


def pipe_latents(pipe, steps: int = PIPE_STEPS, batch: int = 2, seed: int = 0, prompt_seed: int = 0) -> torch.Tensor:
    """The latents the VAE decoder receives (before its clamp), from one call of a tiny DiT or PixArt pipeline."""
    from diffusers import DiTPipeline

    seen = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(batch)]
    try:
        if isinstance(pipe, DiTPipeline):
            pipe(class_labels=list(range(batch)), num_inference_steps=steps, generator=gens, output_type="pt")
        else:
            pipe(**prompts(batch, prompt_seed), num_inference_steps=steps, generator=gens, output_type="pt",
                 use_resolution_binning=False)
    finally:
        handle.remove()
    return seen[0]
