"""The one place that starts ranks: a stage's ranks (``rank_command``: srun inside a SLURM allocation,
torchrun elsewhere), and a training block's through submitit, where it runs and waiting for it.

``launcher: local`` runs the block in a separate process on this machine, ``slurm`` as a
SLURM job, ``debug`` in this process (tests). The rule that calls ``train`` waits for the
block, copies its log into the rule's log as it runs, and fails with the block's log path
when the block fails; an error of the user's input inside the block (an unreadable image or
last.pt, a full disk) is raised here as its own one line. On pre-emption or time-out
(SIGUSR2) the block saves ``train/last.pt`` at that iteration, then submitit requeues the
same call, which resumes from there.

The submitted job is recorded in ``train/job.json``. When ``train`` starts while that job
is still pending or running (the process that waited for it was killed: an ssh drop), it
follows that job instead of submitting a second one writing the same last.pt: a SLURM job
is re-attached to when it runs the same block, else cancelled; a local one (whose
process cannot be waited for by another process) is killed with its processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit
import torch

from deepercluster.errors import InputError, TrainingInputError
from deepercluster.files import atomic_output
from deepercluster.logs import setup_logging
from deepercluster.train.settings import Allocation

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "debug")
# SLURM states of a job that may still run the block (sacct's, through submitit).
UNFINISHED = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
}


# Set in the processes that ``rank_command`` starts, so that they run the stage instead of starting ranks again.
RANK_PROCESS = "DEEPERCLUSTER_RANK_PROCESS"


def rank_command(ranks: int, argv: list[str]) -> list[str] | None:
    """The command that runs ``python -m deepercluster argv`` as ``ranks`` ranks, or None when this
    process should run the stage itself (one task, or already one of the ranks).

    Inside a SLURM allocation the ranks are SLURM tasks (``srun``); elsewhere, local processes
    (``torch.distributed.run``, i.e. torchrun).
    """
    if ranks <= 1 or os.environ.get(RANK_PROCESS):
        return None
    stage = [sys.executable, "-m", "deepercluster", *argv]
    if "SLURM_JOB_ID" in os.environ:
        return ["srun", f"--ntasks={ranks}", "--kill-on-bad-exit=1", *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *stage[1:]]


class TrainingBlockFailed(InputError):
    """The submitted training block ended without its checkpoint."""


class TrainingBlock(submitit.helpers.Checkpointable):
    """``train_block`` as a submitit job on ``threads`` CPU threads per task; requeued (and so
    resumed) on pre-emption or time-out."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __call__(self, **block: Any) -> InputError | None:
        """Run the block; an error of the user's input is returned, not raised, so that ``train`` raises it as
        it is (submitit would hand it over as its traceback's text)."""
        from deepercluster.train.block import train_block  # imported here: starting a stage's ranks needs none of it

        setup_logging()
        torch.set_num_threads(self.threads)
        try:
            train_block(**block)
        except InputError as error:
            return error
        return None


def follow(job: submitit.Job, poll_s: float = 1.0) -> None:
    """Copy the job's stderr (its log and progress) to ours until it ends."""
    position = 0
    while True:
        finished = ended(job)
        if job.paths.stderr.exists():
            with open(job.paths.stderr) as f:
                f.seek(position)
                sys.stderr.write(f.read())
                position = f.tell()
            sys.stderr.flush()
        if finished:
            return
        time.sleep(poll_s)


def ended(job: submitit.Job) -> bool:
    """Whether the job has ended: submitit says so and, for a SLURM job, slurmctld does too. Submitit's word alone
    fails a block that lost a node: the surviving ranks' errors are their tasks' results, and sacct, its state of
    the job, gives the first run's NODE_FAIL for about 2 s after slurmctld has requeued the job."""
    if not job.done():
        return False
    return not isinstance(job, submitit.SlurmJob) or slurm_state(job) not in UNFINISHED


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def is_local_job(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` is still submitit's local controller of a job in ``folder``."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"submitit.local._local" in command and str(folder).encode() in command


def slurm_state(job: submitit.SlurmJob) -> str:
    """The job's state as slurmctld sees it now (squeue: no accounting lag, no slurmdbd needed), else as
    sacct recorded it (a job that left squeue)."""
    queued = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True)
    if queued.returncode == 0 and queued.stdout.strip():
        return queued.stdout.split()[0].upper()
    return job.watcher.get_state(job.job_id, mode="force").split()[0].upper()


def unfinished_job(record: Path, folder: Path, submission: dict[str, Any]) -> submitit.Job | None:
    """The job recorded in ``record`` when it still runs ``submission``; one still running something
    else, or a local one, is ended. None when there is no job to follow."""
    if not record.exists():
        return None
    job = json.loads(record.read_text())
    if job["launcher"] == "local":
        if is_local_job(int(job["job_id"]), folder):
            log.warning("the block's earlier local job %s still runs: killing it and its processes", job["job_id"])
            for pid in process_tree(int(job["job_id"])):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return None
    slurm = submitit.SlurmJob(folder, job["job_id"], tasks=tuple(range(job["submission"]["allocation"]["tasks"])))
    state = slurm_state(slurm)
    if state not in UNFINISHED:
        return None
    if job["submission"] != submission:
        log.warning("the block's earlier SLURM job %s (%s) ran other settings: cancelling it", slurm.job_id, state)
        slurm.cancel(check=False)
        return None
    log.warning("the block's SLURM job %s is still %s: following it instead of submitting anew", slurm.job_id, state)
    return slurm


def train(*, launcher: str, allocation: Allocation, **block: Any) -> None:
    """Stage 'train': submit round r's training block (``train_block``'s arguments ``block``) with ``launcher`` on
    ``allocation``, the rule's ``resources.train``, and wait for it."""
    if launcher not in LAUNCHERS:
        raise TrainingInputError(f"config launcher {launcher!r} is unknown: set one of {', '.join(LAUNCHERS)}")
    if allocation.tasks % allocation.nodes:
        raise TrainingInputError(
            f"config resources.train: tasks ({allocation.tasks}) must be a multiple of nodes ({allocation.nodes})"
        )
    folder, record = Path(block["train_dir"]) / "submitit", Path(block["train_dir"]) / "job.json"
    # As job.json keeps it: the records as their fields.
    submission = json.loads(json.dumps({"launcher": launcher, "allocation": allocation, **block}, default=asdict))
    job = unfinished_job(record, folder, submission) if launcher != "debug" else None
    if job is None:
        job = submit(launcher, folder, allocation, block)
        if launcher != "debug":
            with atomic_output(record) as partial:
                partial.write_text(json.dumps({"launcher": launcher, "job_id": job.job_id, "submission": submission}))
    if launcher != "debug":
        follow(job)
    try:
        errors = [error for error in job.results() if error is not None]
    except submitit.core.utils.UncompletedJobError as error:
        raise TrainingBlockFailed(
            f"the training block of round {block['round']} failed (job {job.job_id}); its log: {job.paths.stderr}\n"
            f"{error}\nfix the cause and rerun: the block resumes from {block['train_dir']}/last.pt"
        ) from error
    if errors:  # the block's own one line (its ranks') naming the file and the fix
        raise errors[0]


def submit(launcher: str, folder: Path, allocation: Allocation, block: dict[str, Any]) -> submitit.Job:
    """Submit the block with ``launcher`` on ``allocation``."""
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    job = {
        "nodes": allocation.nodes,
        "tasks_per_node": allocation.tasks // allocation.nodes,
        "cpus_per_task": allocation.cpus_per_task,
    }
    if allocation.gpus_per_node and allocation.gpu_model:
        job["slurm_gres"] = f"gpu:{allocation.gpu_model}:{allocation.gpus_per_node}"
    elif allocation.gpus_per_node:
        job["gpus_per_node"] = allocation.gpus_per_node
    if allocation.mem_mb:
        job["mem_gb"] = allocation.mem_mb / 1024
    slurm = {
        "slurm_partition": allocation.slurm_partition,
        "slurm_account": allocation.slurm_account,
        "slurm_signal_delay_s": 120,
    }
    executor.update_parameters(
        timeout_min=allocation.timeout_min,
        name=f"train-round-{block['round']}",
        **job,
        **{key: value for key, value in slurm.items() if value is not None},
    )
    submitted = executor.submit(TrainingBlock(allocation.cpus_per_task), **block)
    log.info(
        "training block submitted to %s as job %s; its log: %s", launcher, submitted.job_id, submitted.paths.stderr
    )
    return submitted
