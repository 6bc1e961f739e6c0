"""Tiny random FLUX, SD3, Wan and Qwen-Image pipelines (no VAE, no text encoders: prompt embeddings in,
latents out), as tests/test_families.py and benchmarks/families.py use them."""

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)

STEPS, BATCH, TEXT, WIDTH, POOLED = 5, 2, 5, 12, 10


def nonzero(model: torch.nn.Module) -> torch.nn.Module:
    """Give every all-zero parameter random values, so that no branch is trivially equal to its cache."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def flux(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=WIDTH, pooled_projection_dim=POOLED,
                               axes_dims_rope=(2, 2, 4), guidance_embeds=True)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=nonzero(t))


def sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=WIDTH, caption_projection_dim=16,
                              pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=16,
                              dual_attention_layers=(0,), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(transformer=nonzero(t), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def wan(seed: int = 0) -> WanPipeline:
    torch.manual_seed(seed)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=WIDTH, freq_dim=16, ffn_dim=32, num_layers=2,
                              rope_max_seq_len=32)
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=nonzero(t), vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def qwen(seed: int = 0) -> QwenImagePipeline:
    torch.manual_seed(seed)
    t = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=WIDTH, axes_dims_rope=(2, 2, 4))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=nonzero(t))


PIPES = {"flux": flux, "sd3": sd3, "wan": wan, "qwen": qwen}
# Image tokens per sample of the calls below, and what each pipeline's guidance makes of a step.
TOKENS = {"flux": 16, "sd3": 16, "wan": 2 * 2 * 2, "qwen": 16}  # Wan: 2 latent frames of 2 x 2 patches
PASSES = {"flux": 1, "sd3": 1, "wan": 2, "qwen": 2}  # Wan's CFG and Qwen's true CFG: separate passes


def call_kwargs(kind: str, prompt_seed: int = 0) -> dict:
    """Prompt embeddings as each pipeline takes them (no text encoders), guidance on, latents out."""
    g = torch.Generator().manual_seed(prompt_seed)
    emb = {"prompt_embeds": torch.randn(BATCH, TEXT, WIDTH, generator=g)}
    neg = torch.randn(BATCH, TEXT, WIDTH, generator=g)
    pooled = {"pooled_prompt_embeds": torch.randn(BATCH, POOLED, generator=g)}
    if kind == "flux":  # FLUX.1-dev: distilled guidance embedding, one pass
        return {**emb, **pooled, "guidance_scale": 3.5, "height": 64, "width": 64}
    if kind == "sd3":  # classifier-free guidance in one doubled batch
        return {**emb, **pooled, "negative_prompt_embeds": neg, "height": 64, "width": 64,
                "negative_pooled_prompt_embeds": torch.randn(BATCH, POOLED, generator=g), "guidance_scale": 5.0}
    if kind == "wan":
        return {**emb, "negative_prompt_embeds": neg, "guidance_scale": 5.0, "height": 32, "width": 32,
                "num_frames": 5}
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[0, -2:] = 0  # a shorter prompt in the batch
    return {**emb, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg, "negative_prompt_embeds_mask": mask,
            "true_cfg_scale": 4.0, "height": 64, "width": 64}


def run(pipe, kind: str, steps: int = STEPS, seed: int = 0, prompt_seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**call_kwargs(kind, prompt_seed), num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(seed))
    return out.frames if kind == "wan" else out.images


def with_vae(kind: str, seed: int = 0):
    """The tiny pipeline with a tiny VAE of its family (one downsampling level), so it can decode images."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan

    pipe = PIPES[kind](seed)
    torch.manual_seed(seed)
    if kind in ("flux", "sd3"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=8, shift_factor=0.0)
    else:
        small = dict(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        vae = (AutoencoderKLWan(**small, scale_factor_temporal=1, scale_factor_spatial=2) if kind == "wan"
               else AutoencoderKLQwenImage(**small))
    return type(pipe)(**{**pipe.components, "vae": vae.eval()})
