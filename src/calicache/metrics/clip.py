"""CLIP score of text-to-image samples (Hessel et al. 2021, scaled as torchmetrics' CLIPScore):
100 x max(cos(image embedding, prompt embedding), 0), averaged over images.

Weights come from a local transformers CLIP folder (`CLIPModel` + its processor files, as
`save_pretrained` writes them); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

HOW_TO_GET = ("pass --clip PATH to a local transformers CLIP folder (config.json, weights, tokenizer and "
              "preprocessor files), e.g. one written by CLIPModel/CLIPProcessor.save_pretrained")


def load_clip(path: str | os.PathLike):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder; clear errors otherwise."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {path} (config.json missing): {HOW_TO_GET}")
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise RuntimeError("the CLIP score needs transformers: pip install transformers") from e
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a complete transformers CLIP folder ({e}); {HOW_TO_GET}") from e
    return model.eval(), processor


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (blank lines kept out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give one prompt per line, in sample order")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.inference_mode()
def clip_score(images: np.ndarray, prompts: list[str], model, processor, batch_size: int = 32) -> float:
    """Mean of 100 x max(cos, 0) between each uint8 (H, W, 3) image and its prompt."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image, in order")
    if len(images) == 0:
        raise ValueError("no images to score")
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="CLIP", leave=False):
        batch = [np.asarray(img) for img in images[start : start + batch_size]]
        text = [str(p) for p in prompts[start : start + batch_size]]
        pix = processor(images=batch, return_tensors="pt")["pixel_values"]
        tok = processor(text=text, return_tensors="pt", padding=True, truncation=True,
                        max_length=model.config.text_config.max_position_embeddings)
        # The projections directly: get_*_features changed return types across transformers versions.
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                     attention_mask=tok["attention_mask"]).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        scores.append((100.0 * cos.clamp_min(0)).double())
    return float(torch.cat(scores).mean())
