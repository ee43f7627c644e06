"""The one place that knows submitit: where a training block runs, and waiting for it.

``launcher: local`` runs the block in a separate process on this machine, ``slurm`` as a
SLURM job, ``debug`` in this process (tests). The rule that calls ``train`` waits for the
block, copies its log into the rule's log as it runs, and fails with the block's log path
when the block fails. On pre-emption or time-out, submitit calls ``checkpoint`` and
requeues the same call, which resumes from ``train/last.pt``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from deepercluster.errors import InputError
from deepercluster.logs import setup_logging
from deepercluster.train import train_block

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "debug")


class TrainingBlockFailed(InputError):
    """The submitted training block ended without its checkpoint."""


class TrainingBlock(submitit.helpers.Checkpointable):
    """``train_block`` as a submitit job on ``threads`` CPU threads per task; requeued (and so
    resumed) on pre-emption or time-out."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __call__(self, **block: Any) -> None:
        setup_logging()
        torch.set_num_threads(self.threads)
        train_block(**block)


def follow(job: submitit.Job, poll_s: float = 1.0) -> None:
    """Copy the job's stderr (its log and progress) to ours until it ends."""
    position = 0
    while True:
        finished = job.done()
        if job.paths.stderr.exists():
            with open(job.paths.stderr) as f:
                f.seek(position)
                sys.stderr.write(f.read())
                position = f.tell()
            sys.stderr.flush()
        if finished:
            return
        time.sleep(poll_s)


def train(
    *,
    launcher: str = "local",
    tasks: int = 1,
    nodes: int = 1,
    gpus_per_node: int = 0,
    gpu_model: str | None = None,
    cpus_per_task: int = 2,
    mem_mb: int | None = None,
    timeout_min: int = 1440,
    slurm_partition: str | None = None,
    slurm_account: str | None = None,
    **block: Any,
) -> None:
    """Stage 'train': submit round r's training block with ``launcher`` as ``tasks`` ranks, and wait for it.

    The allocation (nodes, GPUs, CPUs, memory, time, partition, account) is the rule's
    ``resources.train`` from the config; ``tasks`` must be a multiple of ``nodes``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if tasks % nodes:
        raise ValueError(f"resources.train: tasks ({tasks}) must be a multiple of nodes ({nodes})")
    executor = submitit.AutoExecutor(folder=Path(block["train_dir"]) / "submitit", cluster=launcher)
    allocation = {"nodes": nodes, "tasks_per_node": tasks // nodes, "cpus_per_task": cpus_per_task}
    if gpus_per_node and gpu_model:
        allocation["slurm_gres"] = f"gpu:{gpu_model}:{gpus_per_node}"
    elif gpus_per_node:
        allocation["gpus_per_node"] = gpus_per_node
    if mem_mb:
        allocation["mem_gb"] = mem_mb / 1024
    slurm = {"slurm_partition": slurm_partition, "slurm_account": slurm_account, "slurm_signal_delay_s": 120}
    executor.update_parameters(
        timeout_min=timeout_min, name=f"train-round-{block['round']}", **allocation,
        **{key: value for key, value in slurm.items() if value is not None},
    )  # fmt: skip
    job = executor.submit(TrainingBlock(cpus_per_task), **block)
    log.info("training block submitted to %s as job %s; its log: %s", launcher, job.job_id, job.paths.stderr)
    if launcher != "debug":
        follow(job)
    try:
        job.results()
    except submitit.core.utils.UncompletedJobError as error:
        raise TrainingBlockFailed(
            f"the training block of round {block['round']} failed (job {job.job_id}); its log: {job.paths.stderr}\n"
            f"{error}\nfix the cause and rerun: the block resumes from {block['train_dir']}/last.pt"
        ) from error
