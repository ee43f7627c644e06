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

from deepercluster.errors import InputError
from deepercluster.logs import setup_logging
from deepercluster.train import train_block

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "debug")


class TrainingBlockFailed(InputError):
    """The submitted training block ended without its checkpoint."""


class TrainingBlock(submitit.helpers.Checkpointable):
    """``train_block`` as a submitit job; requeued (and so resumed) on pre-emption or time-out."""

    def __call__(self, **block: Any) -> None:
        setup_logging()
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


def train(*, launcher: str = "local", timeout_min: int = 1440, **block: Any) -> None:
    """Stage 'train': submit round r's training block with ``launcher`` and wait for it."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    executor = submitit.AutoExecutor(folder=Path(block["train_dir"]) / "submitit", cluster=launcher)
    executor.update_parameters(timeout_min=timeout_min, name=f"train-round-{block['round']}")
    job = executor.submit(TrainingBlock(), **block)
    log.info("training block submitted to %s as job %s; its log: %s", launcher, job.job_id, job.paths.stderr)
    if launcher != "debug":
        follow(job)
    try:
        job.result()
    except submitit.core.utils.UncompletedJobError as error:
        raise TrainingBlockFailed(
            f"the training block of round {block['round']} failed (job {job.job_id}); its log: {job.paths.stderr}\n"
            f"{error}\nfix the cause and rerun: the block resumes from {block['train_dir']}/last.pt"
        ) from error
