"""Data loaders: IDX parsing, Fashion-MNIST, image folders, .npz files and load_dataset dispatch."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calicache.data import load_dataset, load_image_folder, load_npz
from calicache.data.fashion_mnist import DEFAULT_DIR, load_fashion_mnist, read_idx

REAL = Path(DEFAULT_DIR)
needs_real = pytest.mark.skipif(not (REAL / "t10k-labels-idx1-ubyte.gz").exists(),
                                reason="Debian's dataset-fashion-mnist is not installed")


def idx_bytes(a: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0 0 8 ndim, big-endian dims, raw data."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for split, n, img, lbl in (("train", n_train, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                               ("test", n_test, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for stem, a in ((img, x), (lbl, y)):
            data = idx_bytes(a)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        out[split] = (x, y)
    return out


# ---- IDX and Fashion-MNIST -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 28, 28)])
def test_read_idx_round_trip(tmp_path, shape):
    a = np.arange(int(np.prod(shape))).reshape(shape).astype(np.uint8)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    for name in ("a.idx", "a.idx.gz"):
        b = read_idx(tmp_path / name)
        assert b.dtype == np.uint8 and b.shape == shape
        np.testing.assert_array_equal(a, b)


def test_read_idx_bad_magic(tmp_path):
    a = np.zeros((2, 3), np.uint8)
    bad = bytearray(idx_bytes(a))
    bad[2] = 0x0D  # float data type, not unsigned byte
    (tmp_path / "f").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "f")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "png")


def test_read_idx_truncated(tmp_path):
    data = idx_bytes(np.ones((4, 28, 28), np.uint8))
    (tmp_path / "cut").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "cut")
    (tmp_path / "head").write_bytes(data[:9])  # header promises 3 dims, holds 1.25
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(tmp_path / "head")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-20])  # gzip stream ends early
    with pytest.raises(ValueError, match="unreadable"):
        read_idx(tmp_path / "cut.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_folder(tmp_path, gz):
    want = write_fmnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, tmp_path)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, want[split][0])
        np.testing.assert_array_equal(y, want[split][1])
    x, y = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert x.shape == (5, 28, 28) and y.shape == (5,)


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    write_fmnist(tmp_path)
    monkeypatch.setenv("CALICACHE_FASHION_MNIST", str(tmp_path))
    assert load_dataset("fashion-mnist")[0].shape == (12, 28, 28)


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    write_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_fashion_mnist("val", tmp_path)


def test_fashion_mnist_mismatched_pair(tmp_path):
    write_fmnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ValueError, match="do not pair up"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))
    with pytest.raises(ValueError, match="beyond the 10"):
        load_fashion_mnist("train", tmp_path)


@needs_real
def test_real_fashion_mnist():
    x, y = load_dataset("fashion-mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(y).tolist() == [6000] * 10
    xt, yt = load_dataset("fashion-mnist", "test")
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert yt[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(yt).tolist() == [1000] * 10


# ---- image folders ---------------------------------------------------------------------------

def save(path: Path, a: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path) if mode else Image.fromarray(a).save(path)


def gray(v: int, h: int = 6, w: int = 6) -> np.ndarray:
    return np.full((h, w), v, np.uint8)


def test_image_folder_classes_sorted_and_gray(tmp_path):
    # class names sort as b < cat < dog; files inside a class folder (and its sub-folders) in path order
    save(tmp_path / "dog" / "1.png", gray(30))
    save(tmp_path / "b" / "x.png", gray(10))
    save(tmp_path / "cat" / "a.png", gray(20))
    save(tmp_path / "cat" / "sub" / "z.bmp", gray(21))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    x, y, classes = load_image_folder(tmp_path, progress=False)
    assert classes == ["b", "cat", "dog"]
    assert x.shape == (4, 6, 6) and x.dtype == np.uint8  # grayscale stays one channel
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 1, 2]
    assert x[:, 0, 0].tolist() == [10, 20, 21, 30]
    x2, y2 = load_dataset(tmp_path, progress=False)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_image_folder_colour_wins(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200
    save(tmp_path / "a" / "g.png", gray(50))
    save(tmp_path / "b" / "c.jpg", rgb)
    x, y, _ = load_image_folder(tmp_path, progress=False)
    assert x.shape == (2, 6, 6, 3)
    assert x[0, 0, 0].tolist() == [50, 50, 50]  # the grayscale file replicated
    assert abs(int(x[1, 0, 0, 0]) - 200) <= 3 and x[1, 0, 0, 1] <= 3  # JPEG is lossy


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", gray(i))
    x, y = load_dataset(str(tmp_path), progress=False)
    assert x.shape == (3, 6, 6) and y is None


def test_image_folder_resize_center_crop(tmp_path):
    # 20 wide x 10 high: left half 0, a 4-pixel white stripe in the middle, right half 100
    a = np.zeros((10, 20), np.uint8)
    a[:, 10:] = 100
    a[:, 8:12] = 255
    save(tmp_path / "wide.png", a)
    save(tmp_path / "small.png", gray(7, 4, 4))
    with pytest.raises(ValueError, match="--image-size"):
        load_image_folder(tmp_path, progress=False)
    x, _, _ = load_image_folder(tmp_path, size=5, progress=False)
    assert x.shape == (2, 5, 5)
    # the 10x20 image becomes 5x10 and keeps its central 5 columns: the stripe is in the middle
    wide = x[1]
    assert wide[:, 2].min() > 200 and wide[:, 0].max() < 60 and 60 < wide[:, 4].mean() < 200
    assert (x[0] == 7).all()  # a flat image upsampled stays flat


def test_image_folder_splits(tmp_path):
    save(tmp_path / "train" / "a" / "1.png", gray(1))
    save(tmp_path / "val" / "a" / "2.png", gray(2))
    save(tmp_path / "val" / "b" / "3.png", gray(3))
    x, y = load_dataset(tmp_path, "val", progress=False)
    assert y.tolist() == [0, 1] and x[:, 0, 0].tolist() == [2, 3]
    assert load_dataset(tmp_path, progress=False)[1].tolist() == [0]
    with pytest.raises(FileNotFoundError, match="no 'test' folder"):
        load_dataset(tmp_path, "test", progress=False)
    with pytest.raises(ValueError, match="no 'test' split"):
        load_dataset(tmp_path / "val", "test", progress=False)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path / "empty")
    save(tmp_path / "mixed" / "a" / "1.png", gray(1))
    save(tmp_path / "mixed" / "loose.png", gray(1))
    with pytest.raises(ValueError, match="loose images"):
        load_image_folder(tmp_path / "mixed")
    save(tmp_path / "holes" / "a" / "1.png", gray(1))
    (tmp_path / "holes" / "b").mkdir()
    with pytest.raises(ValueError, match="holds no images; remove it"):
        load_image_folder(tmp_path / "holes")
    save(tmp_path / "broken" / "ok.png", gray(1))
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="bad.png: cannot read"):
        load_image_folder(tmp_path / "broken", progress=False)
    save(tmp_path / "deep" / "16bit.png", np.full((4, 4), 4000, np.uint16))
    with pytest.raises(ValueError, match="not supported"):
        load_image_folder(tmp_path / "deep", progress=False)


# ---- npz -------------------------------------------------------------------------------------

def test_npz_nhwc_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 3, 1, 1, 2], np.int32)
    np.savez(tmp_path / "s.npz", imgs, labels)
    x, y = load_dataset(tmp_path / "s.npz")
    np.testing.assert_array_equal(x, imgs)
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()


def test_npz_gray_forms_and_no_labels(tmp_path):
    imgs = np.arange(4 * 8 * 8, dtype=np.int64).reshape(4, 8, 8).astype(np.uint8)
    np.savez(tmp_path / "nhw.npz", imgs)
    np.savez(tmp_path / "nhw1.npz", arr_0=imgs[..., None])
    for name in ("nhw.npz", "nhw1.npz"):
        x, y = load_npz(tmp_path / name)
        assert y is None and x.shape == (4, 8, 8)
        np.testing.assert_array_equal(x, imgs)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such .npz"):
        load_npz(tmp_path / "none.npz")
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        load_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="transpose"):
        load_npz(tmp_path / "nchw.npz")
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'.*images"):
        load_npz(tmp_path / "named.npz")
    np.savez(tmp_path / "short.npz", np.zeros((3, 8, 8), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "neg.npz", np.zeros((2, 8, 8), np.uint8), np.array([0, -1]))
    with pytest.raises(ValueError, match="negative"):
        load_npz(tmp_path / "neg.npz")
    np.savez(tmp_path / "empty.npz", np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        load_npz(tmp_path / "empty.npz")
    np.savez(tmp_path / "ok.npz", np.zeros((64, 8, 8), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "cut.npz")
    np.save(tmp_path / "single.npy", np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    with pytest.raises(ValueError, match="single .npy array"):
        load_npz(tmp_path / "single.npz")


def test_load_dataset_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        load_dataset("mnist")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not a data set"):
        load_dataset(tmp_path / "a.txt")
    np.savez(tmp_path / "s.npz", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no 'test' split"):
        load_dataset(tmp_path / "s.npz", "test")
    with pytest.raises(ValueError, match="image folders only"):
        load_dataset(tmp_path / "s.npz", size=4)
