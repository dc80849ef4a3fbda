"""An emulated multi-host cluster on one machine: network namespaces on a bridge, links shaped by tc.

    python -m comm_hooks.cluster up --hosts 4 --rate 1gbit [--delay 1ms]
    python -m comm_hooks.cluster run -- python train.py     # mpirun, one rank per host, over the links
    python -m comm_hooks.cluster counters                    # bytes each host sent, from the kernel
    python -m comm_hooks.cluster down

Host i is the namespace ``gq<i>`` with interface ``eth0`` at 10.213.0.<i+1>/24, linked by a veth pair to
the bridge ``gqbr0``; its egress is shaped with ``tc tbf`` (and ``netem`` delay when asked). Everything
is created under the ``gq`` prefix and recorded in a state file; ``down`` removes only what that file
names. Needs root (CAP_NET_ADMIN) and iproute2. Traffic stays on the cluster's own subnet.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from comm_hooks.launch import find_mpirun

PREFIX = "gq"
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.213.0"
STATE = Path(os.environ.get("GRADQ_CLUSTER_STATE", "/run/gradq-cluster.json"))


@dataclass(frozen=True)
class Cluster:
    """A cluster that is up: its hosts (namespace names), their addresses, and the link settings."""

    hosts: list[str]
    addresses: list[str]
    rate: str
    delay: str | None

    @property
    def subnet(self) -> str:
        return f"{SUBNET}.0/24"


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("comm_hooks.cluster needs root (network namespaces and tc); run it with sudo")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("comm_hooks.cluster needs iproute2 (ip and tc): apt-get install iproute2")


def load() -> Cluster | None:
    """The cluster recorded in the state file, or None."""
    if not STATE.exists():
        return None
    return Cluster(**json.loads(STATE.read_text()))


def up(hosts: int, rate: str, delay: str | None = None) -> Cluster:
    """Create ``hosts`` namespaces on a bridge with shaped links; idempotent when the same cluster is up."""
    _require_root()
    if not 2 <= hosts <= 200:
        raise ValueError(f"hosts must be in [2, 200], got {hosts}")
    current = load()
    if current is not None:
        if len(current.hosts) == hosts and current.rate == rate and current.delay == delay:
            return current
        down()
    cluster = Cluster([f"{PREFIX}{i}" for i in range(hosts)], [f"{SUBNET}.{i + 1}" for i in range(hosts)], rate, delay)
    STATE.write_text(json.dumps(asdict(cluster)))  # written first: a failure half-way is cleaned by down()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("link", "set", BRIDGE, "up")
        for i, (host, address) in enumerate(zip(cluster.hosts, cluster.addresses, strict=True)):
            _ip("netns", "add", host)
            _ip("link", "add", f"{PREFIX}v{i}", "type", "veth", "peer", "name", "eth0", "netns", host)
            _ip("link", "set", f"{PREFIX}v{i}", "master", BRIDGE)
            _ip("link", "set", f"{PREFIX}v{i}", "up")
            _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=host)
            _ip("link", "set", "eth0", "up", netns=host)
            _ip("link", "set", "lo", "up", netns=host)
            shape = ["tc", "qdisc", "add", "dev", "eth0", "root"]
            if delay:
                netem = subprocess.run(
                    ["ip", "netns", "exec", host, *shape, "handle", "1:", "netem", "delay", delay],
                    capture_output=True,
                    text=True,
                )
                if netem.returncode:
                    raise RuntimeError(
                        f"tc netem failed ({netem.stderr.strip()}): this kernel lacks sch_netem, so --delay is not "
                        "available here; try `modprobe sch_netem` or leave out --delay"
                    )
                shape = ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:"]
            subprocess.run(
                ["ip", "netns", "exec", host, *shape, "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"],
                check=True,
                capture_output=True,
            )
    except BaseException:
        down()
        raise
    return cluster


def down() -> None:
    """Remove the namespaces, veths and bridge named in the state file (nothing else)."""
    cluster = load()
    if cluster is None:
        return
    _require_root()
    for i, host in enumerate(cluster.hosts):
        _ip("link", "del", f"{PREFIX}v{i}", check=False)
        _ip("netns", "del", host, check=False)
    _ip("link", "del", BRIDGE, check=False)
    STATE.unlink(missing_ok=True)


def tx_bytes(cluster: Cluster) -> dict[str, int]:
    """Bytes each host's eth0 has sent, read from the kernel."""
    _require_root()
    read = ["cat", "/sys/class/net/eth0/statistics/tx_bytes"]
    return {
        host: int(
            subprocess.run(["ip", "netns", "exec", host, *read], check=True, capture_output=True, text=True).stdout
        )
        for host in cluster.hosts
    }


def mpirun_command(cluster: Cluster, command: list[str], agent: Path) -> list[str]:
    """mpirun inside the first host, one rank per host, MPI and Gloo on the cluster's links."""
    mpirun = find_mpirun() or "mpirun"
    return [
        "ip", "netns", "exec", cluster.hosts[0],
        "env", "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        mpirun, "-n", str(len(cluster.hosts)), "-H", ",".join(cluster.hosts),
        # Every emulated host shares this machine's cores: binding would pin all ranks to the same core.
        "--bind-to", "none",
        # The hosts share one hostname (no UTS namespace); Open MPI's hierarchical collectives (han) then
        # deadlock in their first bcast on 2 hosts.
        "--mca", "coll", "^han",
        "--mca", "plm_rsh_agent", str(agent),
        "--mca", "btl_tcp_if_include", cluster.subnet,
        "--prtemca", "prte_if_include", cluster.subnet,
        "-x", "GLOO_SOCKET_IFNAME=eth0", "-x", "PATH",
        *(["-x", "PYTHONPATH"] if "PYTHONPATH" in os.environ else []),
        *command,
    ]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` under mpirun across the cluster that is up."""
    _require_root()
    cluster = load()
    if cluster is None:
        raise SystemExit("no cluster is up: python -m comm_hooks.cluster up --hosts 4 --rate 1gbit")
    with tempfile.TemporaryDirectory() as tmp:
        agent = Path(tmp) / "netns-rsh"
        agent.write_text('#!/bin/sh\nhost="$1"; shift\nexec ip netns exec "$host" /bin/sh -c "$*"\n')
        agent.chmod(0o755)
        return subprocess.run(mpirun_command(cluster, command, agent), check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comm_hooks.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p_up = sub.add_parser("up", help="create the hosts and links")
    p_up.add_argument("--hosts", type=int, default=4)
    p_up.add_argument("--rate", default="1gbit", help="tc rate of each host's egress, e.g. 1gbit, 100mbit")
    p_up.add_argument("--delay", default=None, help="one-way netem delay, e.g. 1ms")
    sub.add_parser("down", help="remove what 'up' created")
    sub.add_parser("counters", help="bytes each host sent")
    p_run = sub.add_parser("run", help="mpirun a command, one rank per host")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.verb == "up":
        cluster = up(args.hosts, args.rate, args.delay)
        print(
            f"up: {len(cluster.hosts)} hosts {cluster.addresses[0]}..{cluster.addresses[-1]} at {cluster.rate}"
            + (f", delay {cluster.delay}" if cluster.delay else "")
        )
    elif args.verb == "down":
        down()
        print("down")
    elif args.verb == "counters":
        cluster = load()
        if cluster is None:
            raise SystemExit("no cluster is up")
        for host, sent in tx_bytes(cluster).items():
            print(f"{host}\t{sent}")
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command after --")
        sys.exit(run(command).returncode)


if __name__ == "__main__":
    main()
