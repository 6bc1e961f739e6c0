import pytest
import torch

from calicache.models.dit import DiT, create_model

torch.set_num_threads(1)


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
