"""`calicache sample`: the three output files, all-or-nothing writing, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import calicache
from calicache.cli import build_parser
from calicache.commands import common
from calicache.commands import sample as sample_cmd
from calicache.images import to_uint8
from calicache.models.io import save_model
from calicache.sampling import sample
from conftest import cli, tiny_model


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path, recommended={"cfg_scale": 2.0, "steps": 3})
    return path


def test_sample_writes_npz_grid_and_report(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("sample", "--model", model_file, "--num", 5, "--steps", 4, "--seed", 2, "--batch-size", 2,
                "--out", out, "--json") == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.json", "samples.npz"]  # no temp files
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()  # grayscale x3
    assert labels.tolist() == [0, 1, 2, 3, 0]
    # The same images as the Python API with the same settings (cfg 2.0 is the file's recommendation).
    expected = to_uint8(sample(tiny_model(), 5, 4, cfg_scale=2.0, seed=2))
    assert np.array_equal(images, expected)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 8, 2 * 8)  # 5 images -> 3 columns, 2 rows
        assert np.array_equal(np.asarray(grid.convert("RGB"))[8:16, 8:16], images[4])
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert [report[k] for k in ("num", "steps", "cfg_scale", "seed", "batch_size")] == [5, 4, 2.0, 2, 2]
    assert report["sampler"] == "ddim" and report["spacing"] == "adm" and report["model_calls_per_batch"] == 4


def test_sample_uses_recommended_settings_and_class_list(model_file, tmp_path):
    out = tmp_path / "run"
    assert cli("sample", "--model", model_file, "--num", 3, "--classes", "3,1", "--sampler", "ddpm", "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["steps"], report["cfg_scale"], report["sampler"]) == (3, 2.0, "ddpm")
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [3, 1, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "a,b"], "--classes must be comma-separated integers"),
    (["--classes", "1,9"], r"class labels \[9\] are outside 0..3"),
    (["--num", "0"], "num must be >= 1"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--cfg-scale", "3", "--cfg-channels", "2"], "cfg_channels must be between 1 and the 1 eps channels"),
])
def test_bad_arguments_fail_cleanly_and_write_nothing(model_file, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert cli("sample", "--model", model_file, "--num", 2, "--steps", 2, "--out", out, *args) == 2
    assert "calicache sample: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        sample_cmd.run(build_parser().parse_args(
            ["sample", "--model", str(model_file), "--num", "2", "--steps", "2", "--out", str(out), *args]))
    assert not out.exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli("sample", "--model", tmp_path / "nope.pt", "--out", tmp_path / "run") == 2
    assert "nope.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _failing_npz(**arrays):
    raise RuntimeError("disk full while writing samples.npz")


def _broken_grid(images, cols=None):
    raise RuntimeError("grid failed")


@pytest.mark.parametrize(("target", "fake"), [("npz_bytes", _failing_npz), ("grid", _broken_grid)])
def test_error_after_sampling_leaves_no_partial_output(model_file, tmp_path, monkeypatch, capsys, target, fake):
    monkeypatch.setattr(common, target, fake)
    out = tmp_path / "run"
    assert cli("sample", "--model", model_file, "--num", 2, "--steps", 2, "--out", out) == 2
    assert "calicache sample: error:" in capsys.readouterr().err
    assert not out.exists()  # no files, no temp files, not even the folder this run would have made
    # An earlier run's complete output in an existing folder is left untouched.
    monkeypatch.undo()
    assert cli("sample", "--model", model_file, "--num", 2, "--steps", 2, "--seed", 1, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(common, target, fake)
    assert cli("sample", "--model", model_file, "--num", 3, "--steps", 2, "--out", out, "--overwrite") == 2
    assert "--overwrite" not in capsys.readouterr().err  # the failure itself, not the refusal to overwrite
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_python_m_calicache_sample_help():
    src = str(Path(calicache.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "calicache", "sample", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--model", "--arch", "--num", "--steps", "--sampler", "--spacing", "--cfg-scale", "--cfg-channels",
                 "--eta", "--seed", "--batch-size", "--classes", "--vae", "--out", "--json"):
        assert flag in done.stdout
    assert "samples.npz" in done.stdout  # the description says what gets written


def test_latent_model_without_vae_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "latent.safetensors"
    torch.manual_seed(0)
    save_model(tiny_model(in_channels=4), path)
    assert cli("sample", "--model", path, "--num", 1, "--steps", 1, "--out", tmp_path / "run") == 2
    assert "pass --vae" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
