"""A real SLURM cluster for the tests marked ``slurm``: one node, or two nodes in network namespaces of their own.

``slurm_cluster`` (session scope) runs ``tests/slurm/cluster.sh start`` once -- installing
Debian's slurm, munge, slurmdbd and mariadb packages when missing -- puts ``SLURM_CONF`` in
``os.environ`` for the session, and runs ``cluster.sh stop`` at the end. ``slurm_two_nodes`` does
the same with ``cluster.sh start --nodes 2`` (node1 and node2); the tests that use it run after all
others (one start of each cluster per session), and its start stops the one-node cluster. A cluster
that was already running before the session, with the same nodes, is used and left running. The
tests are skipped only where the cluster cannot be had at all: not root, or no apt-get; any other
failure to start fails them. Select or leave them out with ``-m slurm`` / ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from defaults import allocation_settings, block_settings

CLUSTER_SH = Path(__file__).resolve().with_name("cluster.sh")
START_TIMEOUT_S = 900  # apt-get install on a fresh machine included


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: runs against a real SLURM cluster on this machine (tests/slurm/cluster.sh; root)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The two-node tests last, so that each cluster starts once."""
    items.sort(key=lambda item: "slurm_two_nodes" in getattr(item, "fixturenames", ()))


@dataclass(frozen=True)
class SlurmCluster:
    """The running cluster: its slurm.conf (also in ``os.environ["SLURM_CONF"]``) and its nodes."""

    conf: Path
    nodes: tuple[str, ...]

    def node_down(self, node: str) -> None:
        """Kill every process of ``node`` (its slurmd, job steps and tasks): the node dies."""
        _check(_cluster_sh("node-down", node, timeout=60))

    def processes(self, node: str) -> int:
        """How many processes run on ``node``: its slurmd, and its jobs' steps and tasks (cluster.sh's namespace)."""
        return len(
            subprocess.run(
                ["ip", "netns", "pids", f"dcslurm-{node}"], capture_output=True, text=True, check=True
            ).stdout.split()
        )

    def node_up(self, node: str) -> None:
        """Start ``node``'s slurmd again and wait until the node is idle."""
        _check(_cluster_sh("node-up", node, timeout=120))


def _cluster_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


def _check(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{done.stderr}"


def _running_nodes() -> int:
    """How many slurmd the cluster of cluster.sh runs (0 when it is not fully running)."""
    status = _cluster_sh("status", timeout=60)
    return len(re.findall(r"^slurmd(?:-\S+)?: running", status.stdout, re.M)) if status.returncode == 0 else 0


def _cluster(nodes: int) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster's daemons run as root: run the tests as root")
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get: cannot install Debian's slurm packages for the SLURM cluster")

    was_running = _running_nodes() == nodes
    started = _cluster_sh("start", "--nodes", str(nodes), timeout=START_TIMEOUT_S)
    if started.returncode != 0:
        pytest.fail(f"cluster.sh start failed (exit {started.returncode}):\n{started.stderr}", pytrace=False)
    exports = [line for line in started.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    assert exports, f"cluster.sh start printed no 'export SLURM_CONF=' line:\n{started.stdout}"
    conf = exports[-1].removeprefix("export SLURM_CONF=")

    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield SlurmCluster(Path(conf), ("localhost",) if nodes == 1 else tuple(f"node{i}" for i in range(1, nodes + 1)))
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running:
            stopped = _cluster_sh("stop", timeout=180)
            assert stopped.returncode == 0, f"cluster.sh stop failed:\n{stopped.stderr}"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The one-node cluster: node localhost."""
    yield from _cluster(nodes=1)


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """The two-node cluster: node1 and node2, each a slurmd in a network and UTS namespace of its own."""
    yield from _cluster(nodes=2)


@pytest.fixture(scope="session")
def block(real_data, class_labels: str) -> dict[str, object]:
    """A DeeperCluster block on the real 600 images, labels from the true classes, no dropout."""
    return {
        "manifest": real_data.manifest,
        "previous_checkpoint": real_data.checkpoint,
        "labels": class_labels,
        "method": "deepercluster",
        "round": 1,
        **block_settings(epochs=1, batch_size=40, dropout=0.0, seed=3),
        **allocation_settings(launcher="slurm", cpus_per_task=1, timeout_min=10),
    }
