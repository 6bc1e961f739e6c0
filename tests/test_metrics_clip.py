import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from calicache.metrics.clip import clip_score, load_clip, read_prompts  # noqa: E402


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny randomly initialised CLIP (model, tokenizer, image processor) saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)


def test_clip_score_matches_the_models_own_similarity(clip_dir):
    model, processor = load_clip(clip_dir)
    images, prompts = _images(), ["a red dress", "a sneaker", "an ankle boot"]
    got = clip_score(images, prompts, model, processor, batch_size=2)
    with torch.no_grad():  # CLIPModel.forward: logits_per_image = exp(logit_scale) * cosine
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        out = model(**inputs)
        cos = torch.diagonal(out.logits_per_image) / model.logit_scale.exp()
    assert got == pytest.approx(float((100 * cos.clamp_min(0)).mean()), rel=1e-4, abs=1e-4)
    # Prompt order matters: the score pairs image i with prompt i.
    assert clip_score(images, prompts[::-1], model, processor) != pytest.approx(got)


def test_missing_clip_and_bad_prompts_are_clear_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip PATH"):
        load_clip(tmp_path / "nothing-here")
    model, processor = load_clip(clip_dir)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip_score(_images(), ["a", "b"], model, processor)
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        read_prompts(tmp_path / "prompts.txt")
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    assert read_prompts(tmp_path / "prompts.txt") == ["a cat", "a dog"]
