"""Run by tests/test_cluster.py under mpirun across the emulated hosts: DDP + a gradq hook over shaped links.

Each rank writes, for the compressed steps only, the bytes its host's eth0 sent (kernel counter) and the
bytes gradq's hook says it sent, to OUTDIR/rank<r>.json.
"""

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
from comm_hooks.launch import init_from_mpi


def tx_bytes() -> int:
    return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())


def main(outdir: str) -> None:
    # Well under the test's own time limit, so that a rank that cannot connect fails with its error.
    rank, world, _ = init_from_mpi(timeout=datetime.timedelta(seconds=90))
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)))
    state = comm_hooks.register(model, "onebit", start_iter=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(rank))
    for step in range(6):
        if step == 1:  # compressed from here on
            dist.barrier()
            sent_before, hook_before = tx_bytes(), state.stats.bytes_sent_total
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    hook = state.stats.bytes_sent_total - hook_before
    wire = tx_bytes() - sent_before  # read before any further collective
    dist.barrier()
    Path(outdir, f"rank{rank}.json").write_text(json.dumps({"wire": wire, "hook": hook, "world": world}))
    state.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
