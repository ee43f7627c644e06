"""The two-node cluster of ``cluster.sh start --nodes 2``: ranks of k-means and of a training block on two machines
(node1 and node2, each its own network namespace, address and hostname), a node lost in the middle of a block,
and a pre-emption of a block on both."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from jobs import block_log, job_id, squeue, start_train, super_clusters, wait_for, weights

from defaults import allocation_settings, run_train

pytestmark = [pytest.mark.slurm]

EPOCHS, BATCH, SAVE_EVERY = 2, 40, 4  # 2 x 15 iterations of the 600 images; a periodic save every 4
ON_TWO_NODES = {"launcher": "slurm", "nodes": 2, "tasks": 4, "mem_mb": 2000}
# Tolerance of 4 ranks against 4 ranks: the one-node tests' (tests/slurm/test_workflow_slurm.py).
RTOL, ATOL = 1e-4, 1e-5
RETURN_SETTLE_S = 5


def test_srun_runs_tasks_on_both_nodes_with_their_own_addresses(slurm_two_nodes) -> None:
    tasks = subprocess.run(
        ["srun", "--nodes=2", "--ntasks=4", "-l", "sh", "-c", 'echo "$(hostname) $(hostname -i)"'],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    by_rank = dict(line.split(": ", 1) for line in tasks.splitlines())
    hosts, addresses = zip(*(by_rank[str(rank)].split() for rank in range(4)), strict=True)
    assert hosts == ("node1", "node1", "node2", "node2")
    assert addresses[0] == addresses[1] != addresses[2] == addresses[3]
    assert not any(address.startswith("127.") for address in addresses)  # the nodes' own interfaces


# Ranks that leave at different times, as a stage's do (rank 0 writes the output after the last collective).
LEAVE_APART = """
import time, torch
from deepercluster.distributed import all_reduce_sum, init_distributed
rank = init_distributed().rank
all_reduce_sum(torch.ones(1000))
time.sleep(1.5 if rank == 0 else 0)
"""


def test_ranks_on_two_nodes_that_leave_apart_exit_cleanly(slurm_two_nodes) -> None:
    # Left to torch's teardown, node2's ranks aborted in 2 of 3 such runs ("terminate called without an active
    # exception"), and --kill-on-bad-exit then ended the step: a stage failed after its work was done.
    for _ in range(2):
        run = subprocess.run(
            ["srun", "--nodes=2", "--ntasks=4", "--kill-on-bad-exit=1", sys.executable, "-c", LEAVE_APART],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]


def joined(log: str) -> list[tuple[str, str, str]]:
    """(rank, hostname, rendezvous address) of each rank that joined the process group, from a log."""
    return re.findall(r"rank (\d+) of \d+ on (\S+) joined the process group \(gloo\) at ([^:\s]+):\d+", log)


def test_four_ranks_on_two_nodes_cluster_as_one_rank(slurm_two_nodes, real_data, tmp_path: Path) -> None:
    one = super_clusters(tmp_path, str(tmp_path / "one.h5"), 1, real_data)
    four = super_clusters(tmp_path, str(tmp_path / "four.h5"), 4, real_data, nodes=2)
    ranks = joined((tmp_path / "four.h5.log").read_text())
    assert sorted(ranks) == [
        ("0", "node1", "node1"),
        ("1", "node1", "node1"),
        ("2", "node2", "node1"),
        ("3", "node2", "node1"),
    ]
    np.testing.assert_allclose(one[0], four[0], atol=1e-5)
    assert np.array_equal(one[1], four[1])
    print(f"k-means, 4 ranks on 2 nodes against 1: centroids differ by at most {np.abs(one[0] - four[0]).max():.3g}")


@pytest.fixture(scope="module")
def two_node_block(slurm_two_nodes, block, tmp_path_factory) -> dict[str, object]:
    """The settings of a block of 4 ranks on 2 nodes, run once uninterrupted: its settings, with ``out`` its
    checkpoint and ``train_dir`` its folder."""
    folder = tmp_path_factory.mktemp("two-nodes")
    settings = {
        **block,
        **ON_TWO_NODES,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "checkpoint_every": SAVE_EVERY,
        "train_dir": str(folder / "train"),
        "out": str(folder / "whole.pt"),
    }
    run_train(**settings)
    return settings


def test_a_block_on_two_nodes_trains_as_four_ranks_on_one(two_node_block, tmp_path: Path) -> None:
    train_dir = Path(two_node_block["train_dir"])
    one_node = {
        **allocation_settings(launcher="local", tasks=4, cpus_per_task=1),
        "train_dir": str(tmp_path),
        "out": str(tmp_path / "one-node.pt"),
    }
    run_train(**{**two_node_block, **one_node})
    ranks = joined(block_log(train_dir))
    assert {host for _, host, _ in ranks} == {"node1", "node2"} and {addr for *_, addr in ranks} == {"node1"}
    losses = [pd.read_csv(folder / "metrics.tsv", sep="\t") for folder in (train_dir, tmp_path)]
    assert len(losses[0]) == len(losses[1]) == EPOCHS * 600 // BATCH
    for key in ("loss_super", "loss_sub"):
        np.testing.assert_allclose(losses[0][key], losses[1][key], rtol=RTOL, atol=ATOL, err_msg=key)
    two, one = weights(Path(two_node_block["out"])), weights(tmp_path / "one-node.pt")
    assert two.keys() == one.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=RTOL, atol=ATOL, err_msg=key)
    loss = max(np.abs(losses[0][key] - losses[1][key]).max() for key in ("loss_super", "loss_sub"))
    print(f"2 nodes against 1: losses differ by at most {loss:.3g}, weights by {max_difference(two, one):.3g}")


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[key] - b[key]).max()) for key in a)


def test_a_block_that_loses_a_node_is_requeued_and_resumes_to_the_same_weights(
    slurm_two_nodes, two_node_block, tmp_path: Path
) -> None:
    train_dir = tmp_path / "train"
    settings = {**two_node_block, "train_dir": str(train_dir), "out": str(tmp_path / "lost.pt")}
    launched = start_train(settings, tmp_path)
    wait_for(lambda: (train_dir / "last.pt").exists(), "the block's first save")
    job, killed = job_id(train_dir), time.monotonic()
    slurm_two_nodes.node_down("node2")
    requeued_at = wait_and_time(lambda: "BeginTime" in squeue(job, "%r"), killed)
    state = subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True, text=True).stdout
    assert state.startswith("down"), state
    cleared_at = wait_and_time(lambda: slurm_two_nodes.processes("node1") == 1, killed)
    slurm_two_nodes.node_up("node2")
    # Started at once, the requeued job lost node2 again here ("2 != 1 allocated nodes"): slurmctld settles a
    # node that comes back within a few seconds (5 s were enough).
    time.sleep(RETURN_SETTLE_S)
    start_requeued(slurm_two_nodes, job)
    _, stderr = launched.communicate(timeout=180)
    done_at = time.monotonic() - killed
    assert launched.returncode == 0, stderr[-3000:]

    log = block_log(train_dir)
    resumed = re.findall(r"resuming round 1 at epoch (\d+), batch (\d+)", log)
    assert len(resumed) == 4 and len(set(resumed)) == 1, log[-3000:]  # every rank, from the same last.pt
    metrics = pd.read_csv(train_dir / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(EPOCHS * 600 // BATCH))
    lost, whole = weights(tmp_path / "lost.pt"), weights(Path(two_node_block["out"]))
    for key in whole:
        np.testing.assert_allclose(lost[key], whole[key], rtol=RTOL, atol=ATOL, err_msg=key)
    print(
        f"node2 killed: job requeued at {requeued_at:.1f} s, node1 cleared at {cleared_at:.1f} s, resumed at epoch "
        f"{resumed[0][0]} batch {resumed[0][1]}, done at {done_at:.1f} s; max weight difference from the "
        f"uninterrupted run {max_difference(lost, whole):.3g}"
    )


def wait_and_time(condition, since: float, timeout_s: float = 120) -> float:
    """Seconds from ``since`` until ``condition()`` holds."""
    wait_for(condition, "a state of the job", timeout_s)
    return time.monotonic() - since


def start_requeued(cluster, job: str, timeout_s: float = 60) -> None:
    """Start the requeued ``job`` now, not 120 s later as SLURM would, once it can start: pending for its begin
    time, its earlier run's steps gone from every node (slurmd refuses to launch a job whose steps still run
    there), and the clock past the second of the requeue. slurmd revokes the job's credential at the requeue, to
    the second, and rejects a new one made in that second too (``ctime <= revoked``): started within it, the job
    failed without output ("Killing non-startable batch JobId=228: Job credential revoked")."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = squeue(job, "%T %r").strip()
        steps = {node: cluster.processes(node) - 1 for node in cluster.nodes}  # besides the node's slurmd
        if state == "PENDING BeginTime" and not any(steps.values()):
            break
        assert time.monotonic() < deadline, (
            f"requeued job {job} not ready to start after {timeout_s} s: squeue says {state!r} (not "
            f"'PENDING BeginTime'), or processes other than slurmd still run on a node: {steps}"
        )
        time.sleep(0.2)
    requeued_in = int(time.time())  # the second of the requeue, or a later one: it came before this check
    while int(time.time()) <= requeued_in:
        time.sleep(0.01)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_a_block_preempted_on_two_nodes_resumes_where_it_saved_to_the_same_weights(
    slurm_two_nodes, two_node_block, tmp_path: Path
) -> None:
    train_dir = tmp_path / "train"
    settings = {**two_node_block, "train_dir": str(train_dir), "out": str(tmp_path / "preempted.pt")}
    launched = start_train(settings, tmp_path)
    wait_for(lambda: "epoch 1/2 batch 7/15" in block_log(train_dir), "7 iterations")
    job, signalled = job_id(train_dir), time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before a pre-emption
    requeued_at = wait_and_time(lambda: "BeginTime" in squeue(job, "%r"), signalled)
    start_requeued(slurm_two_nodes, job)
    _, stderr = launched.communicate(timeout=180)
    assert launched.returncode == 0, stderr[-3000:]

    log = block_log(train_dir)
    saved = re.search(r"pre-emption signal: saved \S+ at epoch (\d+), batch (\d+)", log)
    assert saved, log[-3000:]
    resumed = re.findall(r"resuming round 1 at epoch (\d+), batch (\d+)", log)
    assert resumed == [saved.groups()] * 4, log[-3000:]  # every rank, where the signal was acted on
    assert {host for _, host, _ in joined(log)} == {"node1", "node2"}
    metrics = pd.read_csv(train_dir / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(EPOCHS * 600 // BATCH))
    preempted, whole = weights(tmp_path / "preempted.pt"), weights(Path(two_node_block["out"]))
    for key in whole:
        np.testing.assert_allclose(preempted[key], whole[key], rtol=RTOL, atol=ATOL, err_msg=key)
    print(
        f"USR2 on 2 nodes: saved at epoch {saved[1]} batch {saved[2]}, requeued at {requeued_at:.1f} s; max weight "
        f"difference from the uninterrupted run {max_difference(preempted, whole):.3g}"
    )
