"""Clear errors that name the fix (issue 18 item 7): inputs that gave raw tracebacks, misleading advice
or were silently accepted. Every case also leaves no output behind."""

import json

import numpy as np
import pytest
from PIL import Image

from calicache.cli import main
from calicache.models.io import save_model
from conftest import tiny_model


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--arch", '{"bogus": 1}'], "--arch (arch=) has fields that are not DiT config fields ['bogus']"),
    (["--arch", "{bad"], "--arch: not valid JSON"),
    (["--method", "goc", "--goc-steps", "a,b"], "--goc-steps a,b: GOC steps are comma-separated call indices"),
    (["--seed", str(10**23)], "--seed must be an integer in 0..2**63-1"),
    (["--method", "fora", "--factors", "FACTORS"], "--factors not used by --method fora"),
    (["--method", "forecast", "--period", "9"], "--period 9 is larger than --steps 4"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eta", "-1"], "eta must be in [0, 1]"),
    (["--method", "fora", "--schedule", "RAGGED"], "ragged (rows of different lengths)"),
])
def test_sample_errors_name_the_flag(model_file, tmp_path, capsys, extra, message):
    (tmp_path / "ragged.json").write_text(json.dumps({"gather": [[1, 1, 1, 1], [1, 0]]}))
    extra = [{"FACTORS": str(model_file), "RAGGED": str(tmp_path / "ragged.json")}.get(a, a) for a in extra]
    argv = ["sample", "--model", str(model_file), "--num", "2", "--steps", "4", "--out", str(tmp_path / "out")]
    # --arch applies to checkpoints without a stored config: give a plain state dict for those cases.
    if extra[0] == "--arch":
        import torch

        torch.save(tiny_model().state_dict(), tmp_path / "plain.pt")
        argv[2] = str(tmp_path / "plain.pt")
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _npz(path, n):
    np.savez(path, np.zeros((n, 8, 8, 3), np.uint8), np.zeros(n, np.int64))
    return str(path)


def test_eval_errors_say_what_is_wrong(tmp_path, capsys):
    two, three = _npz(tmp_path / "two.npz", 2), _npz(tmp_path / "three.npz", 3)
    assert main(["eval", "--samples", two, "--against", three, "--classifier", "none"]) == 2
    assert "holds 3 images but --samples" in capsys.readouterr().err
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["eval", "--samples", two, "--ref", str(tmp_path / "x.safetensors"), "--classifier", "none"]) == 2
    err = capsys.readouterr().err
    assert "not an .npz file" in err and "allow_pickle" not in err


def test_calibrate_resizes_folder_images_of_mixed_sizes_to_the_model(model_file, tmp_path, capsys):
    """The error used to suggest --image-size, which calibrate does not have."""
    folder = tmp_path / "imgs" / "0"
    folder.mkdir(parents=True)
    for i, size in enumerate([(8, 8), (12, 10), (9, 14), (8, 8)]):
        Image.fromarray(np.full(size, 30 * i, np.uint8)).save(folder / f"{i}.png")
    assert main(["calibrate", "--model", str(model_file), "--data", str(tmp_path / "imgs"), "--num", "4",
                 "--batch-size", "2", "--steps", "3", "--rank", "2", "--threads", "1",
                 "--out", str(tmp_path / "f.safetensors")]) == 0, capsys.readouterr().err
    assert (tmp_path / "f.safetensors").is_file()
