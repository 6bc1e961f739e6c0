"""torch.distributed: rank helpers, sums over ranks, sharded `calicache sample` (byte-identical merge,
resume, refusal of foreign shards) and errors that end every rank.

Ranks are forked processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) on
gloo, so they run the very code torchrun starts; one test runs the real torchrun (`-m calicache --`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from calicache import distributed
from calicache.cli import main
from calicache.models.io import save_model
from conftest import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 240  # seconds before a test calls it a hang (generous: the machine may be very busy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, log: str, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # pytest's capture objects were inherited through fork: write to the log instead.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(1)
    code = 1
    try:
        code = int(fn(*args) or 0)
    except BaseException:  # noqa: BLE001 - the log shows it; the exit code tells the test
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(tmp_path: Path, fn, *args, world: int = 2) -> tuple[list[int], list[str]]:
    """Run fn(*args) on `world` forked ranks; (exit codes, logs). A rank still alive after TIMEOUT is a hang."""
    ctx = mp.get_context("fork")
    port = _free_port()
    logs = [str(tmp_path / f"rank{r}-{time.monotonic_ns()}.log") for r in range(world)]
    procs = [ctx.Process(target=_child, args=(r, world, port, logs[r], fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    texts = [Path(log).read_text() for log in logs]
    assert not hung, f"ranks {hung} hung:\n" + "\n".join(texts)
    return [p.exitcode for p in procs], texts


def _sum_stats(data: torch.Tensor, batch_size: int, rank: int | None, world: int | None) -> dict:
    """Statistics the way calibration gathers them: running sums over this rank's batches."""
    stats = {"abs_sum": torch.zeros(data.shape[1], dtype=torch.float64), "count": torch.zeros((), dtype=torch.long),
             "sq32": torch.zeros(data.shape[1])}
    for idx in distributed.split_for_rank(len(data), batch_size, rank, world):
        x = data[idx.start : idx.stop]
        stats["abs_sum"] += x.abs().double().sum(0).round()  # integer-valued: exact in any order
        stats["count"] += len(x)
        stats["sq32"] += (x * x).sum(0)
    return stats


def _all_reduce_rank() -> int:
    data = torch.randn(37, 5, generator=torch.Generator().manual_seed(0)) * 10
    with distributed.process_group(timeout=60) as world:
        assert world == 2 and distributed.rank() == int(os.environ["RANK"])
        mine = _sum_stats(data, 4, None, None)
        distributed.all_reduce_sum_(mine)
        one = _sum_stats(data, 4, 0, 1)
        assert torch.equal(mine["abs_sum"], one["abs_sum"]) and int(mine["count"]) == 37
        assert torch.allclose(mine["sq32"], one["sq32"], rtol=1e-6, atol=0)  # float32: summed in another order
        with torch.inference_mode():  # statistics gathered under inference_mode are inference tensors
            t = {"x": torch.full((3,), float(distributed.rank() + 1))}
        distributed.all_reduce_sum_(t)
        assert t["x"].tolist() == [3.0, 3.0, 3.0]
        # Ranks holding different tensors: a clear error on every rank, not a hang.
        bad = {"a": torch.ones(2)} if distributed.rank() == 0 else {"a": torch.ones(3)}
        with pytest.raises(ValueError, match="ranks disagree"):
            distributed.all_reduce_sum_(bad)
    return 0


def test_split_for_rank_gives_each_batch_to_one_rank() -> None:
    assert distributed.batches(10, 3) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    parts = [distributed.split_for_rank(10, 3, r, 3) for r in range(3)]
    assert parts == [[range(0, 3), range(9, 10)], [range(3, 6)], [range(6, 9)]]
    assert distributed.split_for_rank(2, 4, 1, 2) == []
    with pytest.raises(ValueError, match="outside"):
        distributed.split_for_rank(10, 3, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        distributed.batches(10, 0)


def test_helpers_are_no_ops_in_one_process(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    t = {"a": torch.arange(3.0)}
    assert distributed.all_reduce_sum_(t)["a"].tolist() == [0.0, 1.0, 2.0]
    distributed.check_same("anything", "a value")
    c = distributed.Counter("x")
    assert c.add(2) == 2 and c.value() == 2
    with distributed.process_group() as world:
        assert world == 1 and not distributed.is_initialized()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="seconds"):
        distributed.default_timeout()


def test_all_reduce_sums_equal_one_process(tmp_path) -> None:
    codes, logs = run_ranks(tmp_path, _all_reduce_rank)
    assert codes == [0, 0], "\n".join(logs)


# -- sharded sampling -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(tiny_model(), path)
    return path


def _argv(model_file: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model_file), "--num", "10", "--batch-size", "3", "--steps", "6",
            "--threads", "1", "--out", str(out), *extra]


def _single(argv: list[str]) -> bytes:
    assert main(argv) == 0
    return (Path(argv[argv.index("--out") + 1]) / "samples.npz").read_bytes()


def _shards(out: Path) -> dict[str, tuple[int, int]]:
    """Shard name -> (mtime_ns, inode): an atomic rewrite changes both."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(out.glob("shards/*/batch-*.npz"))}


@pytest.mark.parametrize("extra", [(), ("--method", "fora", "--period", "3", "--cfg-scale", "2")],
                         ids=["none", "fora-cfg"])
def test_two_ranks_equal_one_process_byte_for_byte(tmp_path, model_file, extra) -> None:
    expected = _single(_argv(model_file, tmp_path / "one", *extra))
    assert _single(_argv(model_file, tmp_path / "again", *extra)) == expected  # npz bytes are deterministic
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, tmp_path / "two", *extra))
    assert codes == [0, 0], "\n".join(logs)
    assert (tmp_path / "two" / "samples.npz").read_bytes() == expected
    with np.load(tmp_path / "two" / "samples.npz") as f:  # still the npz the ADM evaluator reads
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (10, 8, 8, 3)
        assert f["arr_1"].tolist() == [i % 4 for i in range(10)]
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
    assert json.loads((tmp_path / "two" / "report.json").read_text())["world_size"] == 2
    assert len(_shards(tmp_path / "two")) == 4
    assert "sampling on 2 ranks" in logs[0] and "sampling" not in logs[1]  # only rank 0 shows progress


def test_resume_recomputes_only_missing_shards_and_refuses_foreign_ones(tmp_path, model_file) -> None:
    out = tmp_path / "out"
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out))
    assert codes == [0, 0], "\n".join(logs)
    expected = (out / "samples.npz").read_bytes()
    before = _shards(out)
    folder = next((out / "shards").iterdir())
    # The state a killed run leaves: some shards missing, a half-written temporary file, no samples.npz.
    (folder / "batch-000001.npz").unlink()
    (folder / "batch-000002.npz").unlink()
    (folder / ".batch-000002.npz.k3x9q_zz.tmp.npz").write_bytes(b"half a shard")
    for name in ("samples.npz", "grid.png", "report.json"):
        (out / name).unlink()
    time.sleep(0.01)  # so a rewritten shard would get another mtime
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out))
    assert codes == [0, 0], "\n".join(logs)
    after = _shards(out)
    assert after.keys() == before.keys()
    for name in ("batch-000000.npz", "batch-000003.npz"):
        assert after[name] == before[name], f"{name} was recomputed"
    assert (out / "samples.npz").read_bytes() == expected
    assert not list(folder.glob(".batch-*"))

    # Other settings (another seed) go to another folder and never merge the first run's shards.
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out, "--seed", "1"))
    assert codes == [2, 2] and "pass --overwrite" in logs[0]  # the finished outputs are not replaced unasked
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out, "--seed", "1", "--overwrite"))
    assert codes == [0, 0], "\n".join(logs)
    other = next(p for p in (out / "shards").iterdir() if p != folder)
    assert (out / "samples.npz").read_bytes() != expected
    # A shard of the first run copied into the second run's folder is refused by its rank (rank 0),
    # and both ranks end with a non-zero exit and the message.
    shutil.copy(folder / "batch-000000.npz", other / "batch-000000.npz")
    (out / "samples.npz").unlink()
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out, "--seed", "1", "--overwrite"))
    assert codes[0] != 0 and codes[1] != 0, "\n".join(logs)
    assert "other settings" in logs[0] and "batch-000000.npz" in logs[0]
    assert "stopped because rank 0/2 failed" in logs[1]
    assert not (out / "samples.npz").exists()


def test_error_on_one_rank_ends_torchrun_job(tmp_path, model_file) -> None:
    """Real torchrun: a broken shard of rank 1 ends both ranks with its message (no hang: a hang would
    hit the subprocess timeout); the rerun keeps the shards rank 0 finished before the stop."""
    extra = ("--method", "fora", "--period", "2")
    out = tmp_path / "out"
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out, *extra))
    assert codes == [0, 0], "\n".join(logs)
    expected = (out / "samples.npz").read_bytes()
    folder = next((out / "shards").iterdir())
    for p in folder.glob("batch-*.npz"):
        p.unlink()
    for name in ("samples.npz", "grid.png", "report.json"):  # what a killed run leaves: no outputs
        (out / name).unlink()
    (folder / "batch-000003.npz").write_bytes(b"not a shard")  # batch 3 belongs to rank 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "calicache", "--", *_argv(model_file, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert failed.returncode != 0
    assert "error on rank 1/2" in failed.stderr and "batch-000003.npz: unreadable shard" in failed.stderr
    assert not (out / "samples.npz").exists()
    kept = _shards(out)
    (folder / "batch-000003.npz").unlink()
    codes, logs = run_ranks(tmp_path, main, _argv(model_file, out, *extra))
    assert codes == [0, 0], "\n".join(logs)
    after = _shards(out)
    assert all(after[name] == stat for name, stat in kept.items() if name != "batch-000003.npz")
    assert (out / "samples.npz").read_bytes() == expected


def test_bad_timeout_and_missing_master_are_clear(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        with distributed.process_group():
            pass
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="timeout"):
        with distributed.process_group(timeout=0):
            pass


def test_start_samples_an_index_range_like_the_full_run(model) -> None:
    from calicache import sample

    full = sample(model, 7, 4, batch_size=3, seed=5)
    part = sample(model, 3, 4, batch_size=3, seed=5, start=3)
    assert torch.equal(part, full[3:6])
    classes = [3, 1, 0]
    assert torch.equal(sample(model, 2, 4, classes=classes, start=4, batch_size=2),
                       sample(model, 6, 4, classes=classes, batch_size=2)[4:6])
    with pytest.raises(ValueError, match="start"):
        sample(model, 2, 4, start=-1)
