"""Run a function on W real processes joined in a Gloo process group on loopback, and collect results."""

import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=90)


def _entry(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        result = fn(rank, world_size, Path(workdir), *args)
        torch.save(result, Path(workdir) / f"result{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # The rank's work is done and saved. Leave without the interpreter's finalization: there a Gloo worker
    # thread could still be destroying a finished barrier's work, which frees an all_gather_object tensor
    # and so takes the GIL; the finalizing interpreter makes that thread exit, unwinding through a noexcept
    # destructor: std::terminate (a core dump's backtrace; 3 aborts of a 1-bit Adam test in about 190 runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn: Callable, world_size: int, *args: object, workdir: str | Path | None = None) -> list:
    """``fn(rank, world_size, workdir, *args)`` on each of ``world_size`` processes; their return values.

    ``fn`` must be a module-level function (it is pickled). A failure in any process raises here with
    that process's traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = str(workdir or tmp)
        for stale in Path(work).glob("result*.pt"):
            stale.unlink()
        (Path(work) / "store").unlink(missing_ok=True)
        mp.spawn(_entry, args=(fn, world_size, work, args), nprocs=world_size, join=True)
        return [torch.load(Path(work) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
