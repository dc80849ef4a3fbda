"""Start gradq-bench's ranks: local processes, Open MPI's mpirun, or mpirun across the emulated cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp

from comm_hooks.launch import find_mpirun
from gradq_bench.worker import local_entry


class LaunchError(RuntimeError):
    """The ranks could not be started or one of them failed; the message says which and why."""


@dataclass(frozen=True)
class Link:
    """The emulated links: a tc rate (e.g. ``1gbit``) and an optional one-way delay (e.g. ``1ms``)."""

    rate: str
    delay: str | None = None

    @classmethod
    def parse(cls, text: str) -> Link:
        """``RATE[,DELAY]``, e.g. ``1gbit`` or ``1gbit,1ms``."""
        rate, _, delay = text.partition(",")
        units = ("bit", "kbit", "mbit", "gbit", "bps", "kbps", "mbps", "gbps")
        if not rate or not rate[0].isdigit() or not rate.lower().endswith(units):
            raise ValueError(f"--link {text!r}: the rate must look like 1gbit or 100mbit (tc units), e.g. --link 1gbit")
        if delay and (not delay[0].isdigit() or not delay.endswith(("us", "ms", "s"))):
            raise ValueError(f"--link {text!r}: the delay must look like 1ms, e.g. --link 1gbit,1ms")
        return cls(rate, delay or None)


def run_local(spec_path: Path, ranks: int) -> None:
    """``ranks`` spawned processes on this machine (Gloo over loopback)."""
    try:
        mp.spawn(local_entry, args=(ranks, str(spec_path)), nprocs=ranks, join=True)
    except mp.ProcessRaisedException as exc:
        raise LaunchError(f"a rank failed:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise LaunchError(f"a rank died: {exc}") from None


def _mpirun() -> str:
    found = find_mpirun()
    if found is None:
        raise LaunchError("--launcher mpirun: no mpirun found; install Open MPI (pip install 'gradq[mpi]')")
    return found


def _worker_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "gradq_bench.worker", str(spec_path)]


def run_mpirun(spec_path: Path, ranks: int) -> None:
    """``mpirun -n ranks`` on this machine, traffic on loopback."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [_mpirun(), "--oversubscribe", "--bind-to", "none", "-n", str(ranks), "--mca", "btl_tcp_if_include", "lo",
               "-x", "GLOO_SOCKET_IFNAME=lo", *_worker_command(spec_path)]  # fmt: skip
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode:
        raise LaunchError(f"mpirun exited with status {completed.returncode} (its output is above)")


def require_root_for_cluster() -> None:
    """The clear refusal for --cluster without root."""
    if os.geteuid() != 0:
        raise LaunchError(
            "--cluster needs root: it creates network namespaces and shapes links with tc. Run gradq-bench with "
            "sudo, or leave out --cluster to run local processes over loopback."
        )


def run_cluster(spec_path: Path, hosts: int, link: Link) -> None:
    """One rank per emulated host (``comm_hooks.cluster``), started with mpirun over the shaped links.

    Needs root (the CLI checks first: :func:`require_root_for_cluster`). The cluster is brought up for the
    run and removed afterwards unless the same one was already up.
    """
    from comm_hooks import cluster

    before = cluster.load()
    try:
        cluster.up(hosts, link.rate, link.delay)
    except (RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        raise LaunchError(f"could not bring up the emulated cluster: {exc}") from None
    try:
        completed = cluster.run(_worker_command(spec_path))
    finally:
        if before is None or (len(before.hosts), before.rate, before.delay) != (hosts, link.rate, link.delay):
            cluster.down()
    if completed.returncode:
        raise LaunchError(f"mpirun across the cluster exited with status {completed.returncode} (output above)")
