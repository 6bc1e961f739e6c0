"""torch.distributed for calicache: join a torchrun job, rank helpers, sums across ranks, and errors
that end every rank with their message instead of leaving the others waiting.

Outside torchrun (no RANK / WORLD_SIZE / LOCAL_RANK in the environment) everything here is a no-op
for one process, so the same code runs single-process without a process group.

Long work is coordinated through the rendezvous store (counters and a failure flag polled by rank 0),
not through collectives: a collective waits for the slowest rank and would time out while another
rank is still sampling. Collectives are kept to moments when every rank arrives together (start-up
checks, statistic sums), and all of them have the process group's timeout.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_ENV = "CALICACHE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for a missing rank
POLL = 0.2  # seconds between looks at the store
LINGER = 10 * POLL  # seconds a failing store host waits so that the others read its failure

_store: dist.Store | None = None  # calicache's keys on the rendezvous store, while process_group() is open
_keys = 0  # per-process sequence of store keys; every rank creates them in the same order


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops too."""


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(k in os.environ for k in ENV_VARS)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that shows progress and writes merged outputs."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its local GPU under torchrun when CUDA is there, else the CPU."""
    if launched() and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def default_timeout() -> float:
    """Seconds a collective waits for a missing rank: $CALICACHE_DIST_TIMEOUT or 300."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds (> 0), e.g. 300")
    return value


@contextmanager
def process_group(timeout: float | None = None, backend: str | None = None) -> Iterator[int]:
    """Join the torchrun job for the block (env:// rendezvous; gloo on CPU, nccl on GPU); yields the
    world size. Outside torchrun it yields 1 and sets nothing up; inside an already initialised group
    it reuses that group and leaves it open."""
    global _store
    if not launched():
        yield 1
        return
    if is_initialized():
        yield world_size()
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"RANK/WORLD_SIZE are set but {missing} are not: start the job with torchrun "
                         "(or set MASTER_ADDR and MASTER_PORT to rank 0's address and a free port)")
    seconds = default_timeout() if timeout is None else float(timeout)
    if not seconds > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    td = timedelta(seconds=seconds)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    # Our own rendezvous (what init_process_group does inside) so that we keep the store.
    store, r, w = next(dist.rendezvous("env://", timeout=td))
    store.set_timeout(td)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=r, world_size=w,
                            timeout=td)
    # torchrun's agent store outlives worker restarts: keys of an earlier attempt must not be seen.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _store = dist.PrefixStore(f"calicache/{restart}", store)
    try:
        yield w
    finally:
        _store = None
        dist.destroy_process_group()


def _job_store() -> dist.Store | None:
    if world_size() == 1:
        return None
    if _store is None:
        raise RuntimeError("calicache's counters need the group from calicache.distributed.process_group(); "
                           "join the job with it instead of calling init_process_group yourself")
    return _store


class Counter:
    """A sum over ranks that any rank can add to and read at any time (no collective)."""

    def __init__(self, name: str):
        global _keys
        _keys += 1
        self.key = f"counter/{_keys}/{name}"
        self.store = _job_store()
        self.local = 0

    def add(self, n: int) -> int:
        if self.store is None:
            self.local += int(n)
            return self.local
        return int(self.store.add(self.key, int(n)))

    def value(self) -> int:
        return self.add(0)


def report_failure(message: str) -> None:
    """Flag a failure on the store for ranks that poll it (best effort: the store may be gone)."""
    if _store is None:
        return
    try:
        _store.set("failed", message)
    except Exception:  # noqa: BLE001 - we are already failing; the exit code carries it
        pass


def failure() -> str | None:
    """The failure another rank reported, if any."""
    if _store is None or not _store.check(["failed"]):
        return None
    return _store.get("failed").decode()


def wait_for(counter: Counter, target: int, on_value: Callable[[int], None] | None = None,
             interval: float = POLL) -> None:
    """Poll `counter` until it reaches `target` (no timeout: other ranks may be busy for hours);
    a failure flagged by any rank raises PeerFailed here."""
    while True:
        message = failure()
        if message is not None:
            raise PeerFailed(f"stopped because {message}")
        value = counter.value()
        if on_value is not None:
            on_value(value)
        if value >= target:
            return
        time.sleep(interval)


@contextmanager
def job_progress(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Progress of work split over the ranks: yields `advance(n)`, which a rank calls for each piece of
    its own work it finishes; rank 0's bar counts every rank's (a Counter on the store).

    On a normal exit every rank waits (polling the store, no time limit) until all ranks together
    have done `total`, so that a collective after the block meets ranks that are done, not a rank
    still busy for longer than the collective's timeout; a peer's failure raises PeerFailed there.
    """
    done = Counter(desc)
    world = world_size()
    bar = tqdm(total=total, desc=desc if world == 1 else f"{desc} on {world} ranks",
               disable=not (enabled and is_main()))

    def show(value: int) -> None:
        bar.update(value - bar.n)

    try:
        yield lambda n: show(done.add(n))
        wait_for(done, total, show)
    finally:
        bar.close()


@contextmanager
def guard() -> Iterator[None]:
    """On an error inside a process group: print it with the rank, flag it on the store, and leave
    with os._exit(non-zero), so torchrun stops the other ranks (and ranks polling the store stop on
    the flag). A normal exit could block in the group's teardown while peers wait in a collective."""
    try:
        yield
    except BaseException as e:
        if not is_initialized() or (isinstance(e, SystemExit) and e.code in (0, None)):
            raise
        where = f"rank {rank()}/{world_size()}"
        if isinstance(e, dist.DistNetworkError):  # the store's host (rank 0 or torchrun's agent) has gone
            e = PeerFailed(f"lost the job's store ({e}); another rank has probably failed: see its message")
        user_error = isinstance(e, (ValueError, FileNotFoundError, PeerFailed))
        if isinstance(e, PeerFailed):
            print(f"calicache: {where} {e}", file=sys.stderr, flush=True)
        else:
            if not user_error:
                traceback.print_exc()
            report_failure(f"{where} failed: {type(e).__name__}: {e}")
            print(f"calicache: error on {where}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if _hosts_store():
                time.sleep(LINGER)  # let polling ranks read the flag before the store goes with us
        sys.stdout.flush()
        os._exit(2 if user_error else 1)


def _hosts_store() -> bool:
    """Rank 0 serves the rendezvous store unless torchrun's agent does (env:// rendezvous)."""
    return rank() == 0 and world_size() > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def check_same(value: str, what: str) -> None:
    """Fail on every rank when the ranks disagree on `value` (a hash of settings, weights, layouts)."""
    if world_size() == 1:
        return
    values: list[str | None] = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        listed = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({listed}); start every rank with the same command, "
                         "files and package versions")


def barrier() -> None:
    """All ranks meet (with the group's timeout); nothing to do in one process."""
    if world_size() > 1:
        dist.barrier()


def batches(n: int, batch_size: int) -> list[range]:
    """Global sample indices in batches: batch j = [j * batch_size, (j + 1) * batch_size) cut at n."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def split_for_rank(n: int, batch_size: int, rank_: int | None = None, world: int | None = None) -> list[range]:
    """This rank's batches: batch j goes to rank j % world, so every batch is exactly the batch a
    single process with the same batch size computes (ranks without work get [])."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside 0..{w - 1}")
    return batches(n, batch_size)[r::w]


def all_reduce_sum_(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Sum every tensor over the ranks, in place (a no-op in one process); returns `tensors`.

    Ranks must hold the same names, shapes and dtypes (checked: a mismatch is a clear error on every
    rank, not a hang or a silent mix-up). One all_reduce per dtype over the flattened tensors. Float
    sums are rounded in a different order than one process summing everything would; accumulate in
    float64 (or integers) where that matters.
    """
    if world_size() == 1:
        return tensors
    names = sorted(tensors)
    bad = [n for n in names if tensors[n].dtype == torch.bool or tensors[n].is_complex()]
    if bad:
        raise ValueError(f"cannot sum tensors {bad[:5]} of dtype bool/complex; convert them to a number dtype")
    layout = ";".join(f"{n}:{tuple(tensors[n].shape)}:{tensors[n].dtype}" for n in names)
    check_same(layout, "the names, shapes and dtypes of the tensors to sum")
    dev = device()
    for dtype in sorted({tensors[n].dtype for n in names}, key=str):
        group = [n for n in names if tensors[n].dtype == dtype]
        with torch.no_grad():
            flat = torch.cat([tensors[n].detach().reshape(-1).to(dev) for n in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            parts = flat.split([tensors[n].numel() for n in group])
        for n, part in zip(group, parts):
            t = tensors[n]
            # Statistics gathered under inference_mode are inference tensors: update them in that mode.
            with torch.inference_mode(t.is_inference()), torch.no_grad():
                t.copy_(part.view(t.shape))
    return tensors


LAUNCH_FLAG = "--nproc-per-node"


def without_launch_flag(argv: list[str]) -> list[str]:
    """`argv` without `--nproc-per-node N` (or `--nproc-per-node=N`), as the workers get it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == LAUNCH_FLAG:
            skip = True
        elif not arg.startswith(LAUNCH_FLAG + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `calicache ARGV` on `nproc` worker processes of this machine, as
    `torchrun --standalone --nproc_per_node NPROC -m calicache -- ARGV` would (without the user having
    to know about `--`); returns 0 when every worker succeeded, else 2 (each worker prints its error)."""
    if launched():
        raise ValueError(f"{LAUNCH_FLAG} starts the workers itself, but this process already runs under torchrun; "
                         f"drop {LAUNCH_FLAG} (or start the command without torchrun)")
    if nproc < 1:
        raise ValueError(f"{LAUNCH_FLAG} must be >= 1, got {nproc}")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cmd = ["--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), "--max_restarts", "0",
           "-m", "calicache", "--", *without_launch_flag(argv)]
    try:
        torchrun.main(cmd)
    except ChildFailedError as e:
        failed = sorted(e.failures)
        print(f"calicache: {len(failed)} of {nproc} workers failed (ranks {failed}); see their errors above",
              file=sys.stderr)
        return 2
    return 0
