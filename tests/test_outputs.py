"""Nothing lost (issue 18 items 3-5): outputs are checked before any work, never replace an input or an
existing file unasked, are written to exclusive unpredictable temporaries and committed as one step,
and no planted symlink is followed. Every pre-existing file is compared byte for byte afterwards."""

import json
import os
from pathlib import Path

import pytest
import torch

from calicache.cli import main
from calicache.commands import sample as sample_cmd
from calicache.models.io import save_model
from calicache.utils import Outputs, atomic_path, check_output
from conftest import tiny_model


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links by their target path), for byte-identical comparisons."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link:" + os.readlink(p)).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path, recommended={"cfg_scale": 1.0, "steps": 2})
    return path


def _sample(model_file, out, *extra) -> int:
    return main(["sample", "--model", str(model_file), "--num", "2", "--steps", "2", "--threads", "1",
                 "--out", str(out), *map(str, extra)])


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if sampling starts: the output checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the outputs were checked")

    monkeypatch.setattr(sample_cmd, "sample", refuse)


# -- the helper ---------------------------------------------------------------------------------------

def test_commit_failure_rolls_back_to_the_old_set(tmp_path, monkeypatch):
    for name in ("a.json", "b.json", "c.json"):
        (tmp_path / name).write_text(f"old {name}")
    before = snapshot(tmp_path)
    real = os.replace
    failed = []

    def flaky(src, dst):  # the third output's rename fails once
        if Path(dst).name == "c.json" and not failed:
            failed.append(dst)
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with Outputs() as outputs:
            for name in ("a.json", "b.json", "c.json"):
                outputs.temp(tmp_path / name).write_text(f"new {name}")
    assert snapshot(tmp_path) == before  # the old set, no temporaries, no backups


def test_temporaries_are_exclusive_unpredictable_and_keep_the_suffix(tmp_path):
    outputs = Outputs()
    a, b = outputs.temp(tmp_path / "x.npz"), outputs.temp(tmp_path / "x.npz")
    assert a != b and a.exists() and b.exists() and a.suffix == ".npz" and str(os.getpid()) not in a.name
    outputs.discard()
    assert list(tmp_path.iterdir()) == []


def test_symlinks_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # Links planted at every name the old scheme would have used for the temporary file.
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (out / f".report.tmp-{pid}.json").symlink_to(victim)
    (out / "report.json").symlink_to(victim)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_output(out / "report.json")
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text("{}")
    assert victim.read_text() == "precious"
    assert not (out / "report.json").is_symlink() and (out / "report.json").read_text() == "{}"


def test_an_output_that_became_a_folder_fails_the_commit_and_keeps_the_old_set(tmp_path):
    (tmp_path / "report.json").write_text("old report")
    before = snapshot(tmp_path)
    with pytest.raises(IsADirectoryError, match="grid.png is a folder"):
        with Outputs() as outputs:
            outputs.temp(tmp_path / "report.json").write_text("new report")
            outputs.temp(tmp_path / "grid.png").write_text("new grid")
            (tmp_path / "grid.png").mkdir()  # appears between the check and the commit
    (tmp_path / "grid.png").rmdir()
    assert snapshot(tmp_path) == before


# -- sample ---------------------------------------------------------------------------------------------

def test_sample_refuses_bad_out_paths_before_sampling(model_file, tmp_path, capsys, no_sampling):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    before = snapshot(tmp_path)
    assert _sample(model_file, a_file) == 2
    assert "is a file, but this output is a folder" in capsys.readouterr().err
    assert _sample(model_file, a_file / "sub") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_sample_refuses_a_folder_it_cannot_write_before_sampling(model_file, tmp_path, capsys, monkeypatch,
                                                                 no_sampling):
    # Running as root, permissions cannot make a folder read-only; os.access is what the check asks.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real(p, mode, **kw))
    assert _sample(model_file, tmp_path / "out") == 2
    assert "cannot write in" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_sample_replaces_its_outputs_only_with_overwrite_and_nothing_else(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sample(model_file, out) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert _sample(model_file, out, "--seed", 3) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert _sample(model_file, out, "--seed", 3, "--overwrite") == 0
    after = snapshot(tmp_path)
    assert after["out/notes.txt"] == b"mine" and after["out/samples.npz"] != before["out/samples.npz"]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "report.json", "samples.npz"]


def test_sample_never_writes_over_its_model(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    link = out / "samples.npz"
    os.link(model_file, link)  # the model under an output's name
    before = snapshot(tmp_path)
    assert _sample(model_file, out, "--overwrite") == 2
    assert "is also an input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_interrupt_says_so_and_writes_nothing(model_file, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cmd, "sample", interrupted)
    assert _sample(model_file, tmp_path / "out") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- calibrate, train, convert --------------------------------------------------------------------------

def _calibrate(model_file, out, *extra) -> int:
    return main(["calibrate", "--model", str(model_file), "--method", "goc", "--steps", "3", "--num", "2",
                 "--batch-size", "2", "--threads", "1", "--out", str(out), *extra])


def test_calibrate_never_overwrites_its_model_and_refuses_existing_outputs(model_file, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (tmp_path / "old.json").write_text("older work")
    before = snapshot(tmp_path)
    assert _calibrate(model_file, model_file, "--overwrite") == 2
    assert "is also an input" in capsys.readouterr().err
    assert _calibrate(model_file, folder) == 2
    assert "is a folder, but this output is a file" in capsys.readouterr().err
    assert _calibrate(model_file, tmp_path / "old.json") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert _calibrate(model_file, tmp_path / "old.json", "--overwrite") == 0
    assert json.loads((tmp_path / "old.json").read_text())


def _train(data, out, *extra) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--ckpt-every", "2", "--threads", "1", "--model", "DiT-Tiny/2",
                 "--model-overrides", '{"hidden_size": 32, "depth": 1, "num_heads": 2}', *extra])


def test_train_keeps_a_finished_run_unless_resumed_or_overwritten(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), np.zeros(8, dtype=np.int64))
    assert _train(tmp_path / "data.npz", tmp_path / "run") == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert _train(tmp_path / "data.npz", tmp_path / "run", "--lr", "1e-3") == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    # A pickle carrying code as the state to resume or fine-tune from: a clear error, no traceback.
    (tmp_path / "evil").mkdir()
    torch.save({"model": {}, "x": Path("/")}, tmp_path / "evil" / "state.pt")
    assert _train(tmp_path / "data.npz", tmp_path / "evil", "--resume") == 2
    assert "refused to load" in capsys.readouterr().err
    assert _train(tmp_path / "data.npz", tmp_path / "new", "--init-from", str(tmp_path / "evil" / "state.pt")) == 2
    assert "refused to load" in capsys.readouterr().err
    assert _train(tmp_path / "data.npz", tmp_path / "run", "--overwrite") == 0


def test_convert_overwrite_replaces_only_what_it_writes(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    save_model(tiny_model(), src)
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(["convert", "--from", str(src), "--to", str(folder)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert main(["convert", "--from", str(src), "--to", str(folder), "--overwrite"]) == 0
    assert (folder / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "diffusion_pytorch_model.safetensors"]
    assert main(["convert", "--from", str(src), "--to", str(src), "--overwrite"]) == 2
    assert "is also an input" in capsys.readouterr().err
