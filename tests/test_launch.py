"""Following a training block's SLURM job (deepercluster.launch.follow) until it has ended, with sacct and squeue
stood in for by scripts: no cluster needed."""

from __future__ import annotations

import os
from pathlib import Path

import submitit
from submitit.core.utils import cloudpickle_dump

from deepercluster.launch import follow

JOB = "990001"


def test_a_block_requeued_after_a_lost_node_is_followed_until_slurmctld_ends_it(tmp_path: Path, monkeypatch) -> None:
    """What submitit sees for about 2 s after a node failure's requeue: the ranks of the surviving node wrote their
    errors, and sacct gives the first run's NODE_FAIL. slurmctld has the job pending again: it is followed until
    it runs and completes (squeue), not failed while SLURM runs it on."""
    folder, bin_ = tmp_path / "submitit", tmp_path / "bin"
    folder.mkdir()
    bin_.mkdir()
    for task in (0, 1):  # node1's ranks, whose collective failed when node2 was lost
        cloudpickle_dump(
            ("error", "Connection closed by peer"), submitit.SlurmJob(folder, JOB, (task,)).paths.result_pickle
        )
    (bin_ / "sacct").write_text(f"#!/bin/sh\necho 'JobID|State|NodeList'\necho '{JOB}|NODE_FAIL|node[1-2]'\n")
    asked = tmp_path / "squeue-calls"  # a line a call
    asked.touch()
    states = ["PENDING", "RUNNING", "COMPLETED"]  # squeue's answer at each call
    (bin_ / "squeue").write_text(
        f"#!/bin/sh\necho x >> {asked}\nset -- {' '.join(states)}\nshift $(($(wc -l < {asked}) - 1))\necho $1\n"
    )
    for script in bin_.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")

    job = submitit.SlurmJob(folder, JOB, tasks=(0, 1, 2, 3))
    assert job.done()  # submitit's word alone: ended
    follow(job, poll_s=0)
    assert len(asked.read_text().splitlines()) == len(states)  # followed until squeue said COMPLETED
