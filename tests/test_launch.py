"""`calicache sample/calibrate --nproc-per-node N`: the command starts its own torchrun workers, so users
never meet torchrun's `ambiguous option: --num could match --numa-binding` (issue 18 item 8)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from calicache.cache.methods.goc import GocSteps
from calicache.cli import main
from calicache.distributed import without_launch_flag
from calicache.models.io import save_model
from conftest import tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _calicache(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "calicache", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_launch_flag_is_removed_in_both_spellings():
    assert without_launch_flag(["sample", "--nproc-per-node", "2", "--num", "8"]) == ["sample", "--num", "8"]
    assert without_launch_flag(["sample", "--nproc-per-node=2", "--num", "8"]) == ["sample", "--num", "8"]


def test_sample_nproc_per_node_launches_workers_and_matches_one_process(tmp_path):
    model = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), model)
    common = ["--model", str(model), "--num", "6", "--batch-size", "3", "--steps", "3", "--threads", "1"]
    launched = _calicache("sample", "--nproc-per-node", "2", *common, "--out", str(tmp_path / "two"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert main(["sample", *common, "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()
    assert list((tmp_path / "two" / "shards").iterdir())  # the sharded path ran

def test_calibrate_nproc_per_node_launches_workers_and_matches_one_process(tmp_path):
    """The same launch path for calibrate: two workers find the GOC steps one process finds (rank 0 writes)."""
    model = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), model)
    common = ["--model", str(model), "--method", "goc", "--num", "4", "--batch-size", "2", "--steps", "5",
              "--threads", "1", "--json"]
    launched = _calicache("calibrate", "--nproc-per-node", "2", *common, "--out", str(tmp_path / "two.json"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads(launched.stdout)["world_size"] == 2  # one report: rank 0's
    assert main(["calibrate", *common, "--out", str(tmp_path / "one.json")]) == 0
    two, one = GocSteps.load(tmp_path / "two.json"), GocSteps.load(tmp_path / "one.json")
    assert two.steps == one.steps and two.meta == one.meta
    np.testing.assert_allclose(two.cosines[2:], one.cosines[2:], rtol=1e-6, atol=1e-9)  # split sums may round apart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "tiny.safetensors", "two.json"]


def test_launch_checks_outputs_before_starting_workers(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples.npz").write_bytes(b"finished work")
    assert main(["sample", "--nproc-per-node", "2", "--num", "2", "--out", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "samples.npz").read_bytes() == b"finished work"
