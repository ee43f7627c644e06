"""A real single-node SLURM cluster for the tests marked ``slurm``.

``slurm_cluster`` (session scope) runs ``tests/slurm/cluster.sh start`` once -- installing
Debian's slurm, munge, slurmdbd and mariadb packages when missing -- puts ``SLURM_CONF`` in
``os.environ`` for the session, and runs ``cluster.sh stop`` at the end. A cluster that was
already running before the session is used and left running. The tests are skipped only where
the cluster cannot be had at all: not root, or no apt-get; any other failure to start fails them.
Select or leave them out with ``-m slurm`` / ``-m "not slurm"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().with_name("cluster.sh")
START_TIMEOUT_S = 900  # apt-get install on a fresh machine included


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: runs against a real single-node SLURM cluster (tests/slurm/cluster.sh; root)"
    )


@dataclass(frozen=True)
class SlurmCluster:
    """The running cluster: its slurm.conf (also in ``os.environ["SLURM_CONF"]``)."""

    conf: Path


def _cluster_sh(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLUSTER_SH), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster's daemons run as root: run the tests as root")
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get: cannot install Debian's slurm packages for the SLURM cluster")

    was_running = _cluster_sh("status", timeout=60).returncode == 0
    started = _cluster_sh("start", timeout=START_TIMEOUT_S)
    if started.returncode != 0:
        pytest.fail(f"cluster.sh start failed (exit {started.returncode}):\n{started.stderr}", pytrace=False)
    exports = [line for line in started.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    assert exports, f"cluster.sh start printed no 'export SLURM_CONF=' line:\n{started.stdout}"
    conf = exports[-1].removeprefix("export SLURM_CONF=")

    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield SlurmCluster(conf=Path(conf))
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running:
            stopped = _cluster_sh("stop", timeout=180)
            assert stopped.returncode == 0, f"cluster.sh stop failed:\n{stopped.stderr}"
