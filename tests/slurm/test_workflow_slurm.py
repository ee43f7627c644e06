"""The workflow on the real local SLURM cluster: the slurm profile, training blocks as SLURM jobs,
several ranks for k-means and training, and a cancelled block resumed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from deepercluster.checkpoints import load_checkpoint
from deepercluster.launch import train

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def test_one_round_through_the_slurm_profile(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / ".test/config.yaml").read_text())
    config |= {"rounds": 1, "resources": {"default": {"cpus_per_task": 1, "mem_mb": 1000, "runtime": 10}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml"]
    command += ["--profile", str(REPO / "profiles/slurm"), "--slurm-init-seconds-before-status-checks", "1"]
    started = time.time()
    run = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PATH": VENV_PATH}, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "results/summary.tsv").is_file() and (tmp_path / "results/rounds/1/checkpoint.pt").is_file()

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started - 5))
    jobs = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, "-o", "JobName%80,State,WorkDir%200"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    ours = [line.split("|") for line in jobs.splitlines() if line.split("|")[2] == str(tmp_path)]
    names = " ".join(name for name, _, _ in ours)
    assert all(state == "COMPLETED" for _, state, _ in ours), ours
    # 1 manifest + 1 init + 2 shards + pca + super + 2 sub + labels + summary snakemake jobs, and the block
    assert len(ours) >= 11, ours
    assert "train-round-1" in names
    log = (tmp_path / "results/logs/rounds/1/checkpoint.log").read_text()
    assert "training block submitted to slurm" in log


def super_clusters(workdir: Path, out: str, tasks: int, real_data) -> np.ndarray:
    """Level 1 on the real shards as one SLURM job of ``tasks`` tasks; (centroids, assignments)."""
    stage = [sys.executable, "-m", "deepercluster", "--tasks", str(tasks), "super-clusters", "--out", out]
    stage += ["--shards", *real_data.shards, "--pca", real_data.pca, "--super-clusters", "3"]
    stage += ["--iterations", "5", "--seed", "0"]
    subprocess.run(["sbatch", "--wait", f"--ntasks={tasks}", "--cpus-per-task=1", f"--output={out}.log",
                    "--wrap", " ".join(stage)], cwd=workdir, env={**os.environ, "PATH": VENV_PATH},
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    with h5py.File(out) as f:
        return f["centroids"][:], f["assignments"][:]


def test_two_task_kmeans_equals_one_task(real_data, tmp_path: Path) -> None:
    one = super_clusters(tmp_path, str(tmp_path / "one.h5"), 1, real_data)
    two = super_clusters(tmp_path, str(tmp_path / "two.h5"), 2, real_data)
    assert "rank 1 of 2 joined" in (tmp_path / "two.h5.log").read_text()
    np.testing.assert_allclose(one[0], two[0], atol=1e-5)
    assert np.array_equal(one[1], two[1])


@pytest.fixture
def block(real_data, class_labels: str) -> dict[str, object]:
    """A DeeperCluster block on the real 600 images, labels from the true classes, no dropout."""
    return {
        "manifest": real_data.manifest, "previous_checkpoint": real_data.checkpoint, "labels": class_labels,
        "method": "deepercluster", "round": 1, "epochs": 1, "batch_size": 40, "dropout": 0.0, "seed": 3,
        "launcher": "slurm", "cpus_per_task": 1, "timeout_min": 10,
    }  # fmt: skip


def weights(path: Path, parts: tuple[str, ...] = ("model", "heads")) -> dict[str, np.ndarray]:
    state = load_checkpoint(path)
    return {f"{part}.{k}": v.float().numpy() for part in parts for k, v in state[part].items()}


def test_two_task_block_equals_one_task_on_the_same_global_batch(block, tmp_path: Path) -> None:
    # One SGD step on one global batch of the 600 images, 2 x 300 on two tasks. Its forward pass is the same bit
    # for bit on one task and two (GlobalBatchNorm2d's statistics do not depend on the split), so the weights
    # differ only by the rounding of the gradient sums. Over several steps that rounding can tip a max-pool
    # near-tie the other way on one side, a difference training then amplifies: one step is where the claim holds.
    one_step = {**block, "batch_size": 600}
    for tasks in (1, 2):
        train(**one_step, tasks=tasks, train_dir=str(tmp_path / f"tasks{tasks}"), out=str(tmp_path / f"{tasks}.pt"))
    one, two = weights(tmp_path / "1.pt"), weights(tmp_path / "2.pt")
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, atol=1e-5, err_msg=key)
    losses = [pd.read_csv(tmp_path / f"tasks{tasks}/metrics.tsv", sep="\t") for tasks in (1, 2)]
    assert len(losses[0]) == len(losses[1]) == 1
    for key in ("loss_super", "loss_sub"):
        np.testing.assert_allclose(losses[0][key], losses[1][key], rtol=1e-4, atol=1e-5, err_msg=key)
    before = weights(Path(block["previous_checkpoint"]), parts=("model",))
    assert not np.allclose(one["model.features.0.weight"], before["model.features.0.weight"])  # it trained


def test_a_cancelled_block_resumes_from_its_checkpoint(block, tmp_path: Path) -> None:
    train_dir = tmp_path / "train"
    # Long enough to outlast scancel's grace period: submitit lets SIGTERM pass, SLURM kills after KillWait.
    epochs = 20
    settings = {
        **block,
        "epochs": epochs,
        "checkpoint_every": 3,
        "train_dir": str(train_dir),
        "out": str(tmp_path / "x.pt"),
    }
    launched = subprocess.Popen(
        [sys.executable, "-c", f"from deepercluster.launch import train; train(**{settings!r})"],
        env={**os.environ, "PATH": VENV_PATH}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (train_dir / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--name=train-round-1"], check=True)
    _, stderr = launched.communicate(timeout=120)
    assert launched.returncode != 0 and "TrainingBlockFailed" in stderr and "last.pt" in stderr
    stopped_at = load_checkpoint(train_dir / "last.pt")
    assert (stopped_at["epoch"], stopped_at["batch"]) < (epochs, 0)

    train(**settings)
    assert (tmp_path / "x.pt").is_file()
    metrics = pd.read_csv(train_dir / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(epochs * 600 // 40))
    logs = [p.read_text() for p in (train_dir / "submitit").glob("*_log.err")]
    assert sum("resuming round 1 at epoch" in text for text in logs) == 1
