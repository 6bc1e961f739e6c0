"""Defaults and output the docs promise: calibrate's steps match sampling's, `calibrate --method goc`
shows its cosines, a pipeline refuses DiT-only flags whatever their value, `macs` prints the guided total."""

import json

import numpy as np
import pytest

from calicache import calibrate, save_model
from calicache.calibration.goc import find_goc_steps
from calicache.cli import main
from calicache.sampling import default_steps
from conftest import tiny_model


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), rng.integers(0, 4, 4)


def test_calibrate_defaults_to_the_steps_sampling_uses(images):
    model = tiny_model()
    assert default_steps(model) == 50 and default_steps(model, 7) == 7
    assert calibrate(model, images, svd="cd", rank=2, num=4, batch_size=2).meta["steps"] == 50
    model.calicache_defaults = {"steps": 6}  # what load_model reads from a file saved with recommended=
    assert default_steps(model) == 6
    assert calibrate(model, images, svd="cd", rank=2, num=4, batch_size=2).meta["steps"] == 6
    assert find_goc_steps(model, num=2).meta["steps"] == 6


def test_calibrate_goc_prints_the_cosines(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path, recommended={"steps": 5})
    argv = ["calibrate", "--method", "goc", "--model", str(path), "--num", "2", "--out", str(tmp_path / "g.json")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "cos(d_s, d_s-1)" in table and len([line for line in table.splitlines() if line[:4].strip().isdigit()]) == 5
    assert main([*argv, "--json", "--overwrite"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 5 and len(report["cosines"]) == 5 and report["cosines"][:2] == [None, None]
    assert report["compensated"] == json.loads((tmp_path / "g.json").read_text())["steps"]


@pytest.mark.parametrize("flag", [["--sampler", "ddim"], ["--spacing", "adm"], ["--period", "2"],
                                  ["--threshold", "0"], ["--forecast-weight", "1"]])
def test_pipeline_refuses_dit_flags_even_at_their_defaults(tmp_path, capsys, flag):
    out = tmp_path / "f.safetensors"
    argv = ["calibrate", "--pipeline", str(tmp_path / "pipe"), "--prompt-embeds", "e.pt", "--out", str(out)]
    assert main([*argv, *flag]) == 2
    assert flag[0] in capsys.readouterr().err and not out.exists()


def test_macs_prints_the_guided_total(capsys):
    assert main(["macs", "--model", "DiT-S/2", "--steps", "4", "--cfg-scale", "1.5"]) == 0
    text = capsys.readouterr().out
    assert main(["macs", "--model", "DiT-S/2", "--steps", "4", "--cfg-scale", "1.5", "--json"]) == 0
    macs = json.loads(capsys.readouterr().out)
    assert f"{macs['total_with_cfg'] / 1e9:.2f} GMACs" in text and macs["total_with_cfg"] == 2 * macs["total"]
