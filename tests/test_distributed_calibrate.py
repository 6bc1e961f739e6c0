"""`calicache calibrate` under torch.distributed: CA/CD statistics and GOC cosines summed over 2 gloo
ranks give what one process gives (also with an odd number of batches and with an idle rank), rank 0
writes the file, and an error on one rank ends both with its message.

Ranks are forked processes with torchrun's environment (tests/test_distributed.py); one test runs the
real `torchrun ... -m calicache -- calibrate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calicache import distributed
from calicache.adapters import get_adapter
from calicache.cache.factors import Factors
from calicache.calibration.calibrate import gather_statistics
from calicache.calibration.goc import GocSteps
from calicache.cli import main
from calicache.models.io import save_model
from conftest import tiny_model
from test_distributed import SRC, TIMEOUT, _free_port, run_ranks

STEPS = "6"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("calib")
    save_model(tiny_model(), folder / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(folder / "d.npz", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 4, 40))
    return folder / "m.safetensors", folder / "d.npz"


def _argv(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, data = files
    return ["calibrate", "--model", str(model), "--data", str(data), "--steps", STEPS, "--rank", "6",
            "--threads", "1", "--json", "--out", str(out), *extra]


def _products(path: Path) -> dict[str, torch.Tensor]:
    """A @ B per linear: the factorisation without the SVD's sign freedom."""
    return {name: a @ b for name, (a, b) in Factors.load(path).tensors.items()}


def _assert_same_factors(got: Path, want: Path) -> None:
    g, w = _products(got), _products(want)
    assert g.keys() == w.keys()
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=name)
    assert Factors.load(got).meta == Factors.load(want).meta


# -- the statistics themselves ------------------------------------------------------------------

CASES = {("cd", 20, 4): "5 batches: rank 0 gets 3, rank 1 gets 2", ("ca", 6, 8): "1 batch: rank 1 has none"}


def _statistics_rank(model, data, expected: dict) -> int:
    specs = [s for b in get_adapter(model).branches(model) for s in b.linears]
    with distributed.process_group(timeout=60):
        for (kind, num, batch_size), want in expected.items():
            stats = gather_statistics(model, data, kind, specs, num=num, batch_size=batch_size, steps=int(STEPS))
            assert stats.count == num, (kind, stats.count)
            got = stats.means()
            assert got.keys() == want.keys()
            for key in want:  # float64 sums added in another order: equal to rounding
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=0, msg=f"{kind} {key}")
    return 0


def test_every_rank_gets_the_statistics_of_one_process(tmp_path) -> None:
    model = tiny_model()
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), rng.integers(0, 4, 24))
    specs = [s for b in get_adapter(model).branches(model) for s in b.linears]
    expected = {case: gather_statistics(model, data, case[0], specs, num=case[1], batch_size=case[2],
                                        steps=int(STEPS)).means() for case in CASES}
    codes, logs = run_ranks(tmp_path, _statistics_rank, model, data, expected)
    assert codes == [0, 0], "\n".join(logs)


# -- the command ----------------------------------------------------------------------------------

def test_torchrun_calibrate_cd_equals_one_process(tmp_path, files) -> None:
    """The real launcher; 5 batches of 4, so rank 0 computes 3 and rank 1 computes 2."""
    extra = ("--svd", "cd", "--num", "20", "--batch-size", "4")
    assert main(_argv(files, tmp_path / "one.safetensors", *extra)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "calicache", "--", *_argv(files, tmp_path / "two.safetensors", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)  # one report: only rank 0 prints
    assert report["world_size"] == 2 and report["num"] == 20 and report["rank_max"] == 6
    assert "calibrating (CD statistics) on 2 ranks" in done.stderr
    _assert_same_factors(tmp_path / "two.safetensors", tmp_path / "one.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


@pytest.mark.parametrize("extra", [("--svd", "ca", "--num", "14", "--batch-size", "4"),
                                   ("--method", "goc", "--num", "6", "--batch-size", "2")], ids=["ca", "goc"])
def test_two_ranks_write_what_one_process_writes(tmp_path, files, extra) -> None:
    goc = "goc" in extra
    name = "steps.json" if goc else "f.safetensors"
    assert main(_argv(files, tmp_path / "one" / name, *extra)) == 0
    codes, logs = run_ranks(tmp_path, main, _argv(files, tmp_path / "two" / name, *extra))
    assert codes == [0, 0], "\n".join(logs)
    assert json.loads(logs[0][logs[0].index("{"):])["world_size"] == 2
    assert "world_size" not in logs[1] and "on 2 ranks" not in logs[1]  # rank 1 neither reports nor shows progress
    assert [p.name for p in (tmp_path / "two").iterdir()] == [name]
    if not goc:
        _assert_same_factors(tmp_path / "two" / name, tmp_path / "one" / name)
        return
    got, want = GocSteps.load(tmp_path / "two" / name), GocSteps.load(tmp_path / "one" / name)
    assert got.steps == want.steps and got.meta == want.meta
    assert got.cosines[:2] == want.cosines[:2] == [None, None]
    np.testing.assert_allclose(got.cosines[2:], want.cosines[2:], rtol=1e-9, atol=1e-12)


def _main_failing_on_rank_1(argv: list[str]) -> int:
    if os.environ["RANK"] == "1":
        from calicache.calibration.inputs import ModelSpaceBatches

        def unreadable(self, idx, gens, device):
            raise ValueError("calibration batch unreadable (injected on rank 1)")

        ModelSpaceBatches.__call__ = unreadable  # this forked rank only
    return main(argv)


def test_error_on_one_rank_ends_both_with_its_message(tmp_path, files) -> None:
    out = tmp_path / "f.safetensors"
    codes, logs = run_ranks(tmp_path, _main_failing_on_rank_1, _argv(files, out, "--num", "20", "--batch-size", "4"))
    assert codes == [2, 2], "\n".join(logs)
    assert "error on rank 1/2: ValueError: calibration batch unreadable" in logs[1]
    assert "rank 0/2 stopped because rank 1/2 failed: ValueError: calibration batch unreadable" in logs[0]
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".f*"))
