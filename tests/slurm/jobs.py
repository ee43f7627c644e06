"""What the SLURM tests share: a stage's ranks as one batch job, a training block started as the train rule
starts it, and reading its job, log and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from deepercluster.checkpoints import load_checkpoint
from defaults import train_command

VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def super_clusters(workdir: Path, out: str, tasks: int, real_data, nodes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Level 1 on the real shards as one SLURM job of ``tasks`` tasks on ``nodes`` nodes, by the super_clusters
    rule's command; (centroids, assignments)."""
    stage = [sys.executable, "-m", "deepercluster", "--ranks", str(tasks), "super-clusters", "--out", out]
    stage += ["--shards", *real_data.shards, "--pca", real_data.pca, "--super-clusters", "3"]
    stage += ["--iterations", "5", "--seed", "0", "--cache-mb", "4096", "--dtype", "float16"]
    sbatch = ["sbatch", "--wait", f"--nodes={nodes}", f"--ntasks={tasks}", "--cpus-per-task=1", f"--output={out}.log"]
    job = subprocess.run(
        [*sbatch, "--wrap", " ".join(stage)],
        cwd=workdir,
        env={**os.environ, "PATH": VENV_PATH},
        timeout=300,
        capture_output=True,
        text=True,
    )
    log = Path(f"{out}.log").read_text() if Path(f"{out}.log").exists() else "(no job log)"
    assert job.returncode == 0, f"sbatch exit {job.returncode}: {job.stderr}\n{log[-3000:]}"
    with h5py.File(out) as f:
        return f["centroids"][:], f["assignments"][:]


def weights(path: Path, parts: tuple[str, ...] = ("model", "heads")) -> dict[str, np.ndarray]:
    state = load_checkpoint(path)
    return {f"{part}.{k}": v.float().numpy() for part in parts for k, v in state[part].items()}


def start_train(settings: dict[str, object], cwd: Path) -> subprocess.Popen:
    """The train stage of flat ``settings`` in a process of its own, as the train rule runs it."""
    return subprocess.Popen(
        train_command(settings),
        cwd=cwd,
        env={**os.environ, "PATH": VENV_PATH},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.2)


def block_log(train_dir: Path) -> str:
    """The block's log so far (every task, every run of its job)."""
    return "".join(path.read_text() for path in sorted((train_dir / "submitit").glob("*_log.err")))


def job_id(train_dir: Path) -> str:
    return json.loads((train_dir / "job.json").read_text())["job_id"]


def squeue(job: str, fields: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", fields], capture_output=True, text=True).stdout
