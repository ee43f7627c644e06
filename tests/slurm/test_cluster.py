"""The real single-node SLURM cluster of ``cluster.sh``: batch jobs, job steps, accounting, submitit."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

JOB_TIMEOUT_S = 120


def run(*args: str) -> str:
    """Run a Slurm client command; its stdout. Fails with its stderr on a non-zero exit."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def sbatch(*args: str) -> str:
    """Submit a batch job; its id."""
    return run("sbatch", "--parsable", *args).strip().split(";")[0]


def sacct_state(job: str) -> str:
    """The job's state as accounting has it ('' until slurmdbd has heard of the job)."""
    return run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State").strip()


def wait_sacct(job: str, *finals: str) -> str:
    """Poll sacct until the job's state starts with one of ``finals``; that state."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        state = sacct_state(job)
        if state.startswith(finals):
            return state
        if time.monotonic() > deadline:
            squeue = run("squeue", "-j", job, "-o", "%i %T %r")
            pytest.fail(f"job {job} not {'/'.join(finals)} after {JOB_TIMEOUT_S}s: sacct {state!r}\n{squeue}")
        time.sleep(0.1)


def wait_squeue(job: str, *states: str) -> str:
    """Poll squeue (finished jobs stay there for MinJobAge) until the job is in one of ``states``."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        state = run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T").strip()
        if state in states:
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} not {'/'.join(states)} after {JOB_TIMEOUT_S}s: squeue {state!r}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def echo_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, float]:
    """``sbatch --wrap 'echo hi'``, waited for: (job id, output file, seconds to COMPLETED in sacct)."""
    out = tmp_path_factory.mktemp("echo") / "hi.out"
    start = time.monotonic()
    job = sbatch("-o", str(out), "--wrap", "echo hi")
    wait_sacct(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return job, out, time.monotonic() - start


def test_batch_job_writes_its_output(echo_job: tuple[str, Path, float]) -> None:
    _, out, _ = echo_job
    assert out.read_text().strip() == "hi"


def test_batch_job_completed_in_sacct(echo_job: tuple[str, Path, float]) -> None:
    job, _, seconds = echo_job
    assert sacct_state(job) == "COMPLETED"
    steps = run("sacct", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode,Account").split()
    assert f"{job}|COMPLETED|0:0|deepercluster" in steps
    assert f"{job}.batch|COMPLETED|0:0|deepercluster" in steps
    print(f"sbatch -> COMPLETED in sacct: {seconds:.2f} s")


def test_job_step_runs_two_tasks(tmp_path: Path) -> None:
    out = tmp_path / "hostname.out"
    job = sbatch("-n", "2", "-o", str(out), "--wrap", "srun hostname")
    assert wait_sacct(job, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") == "COMPLETED"
    assert out.read_text().split() == [socket.gethostname()] * 2
    steps = dict(
        line.split("|")
        for line in run("sacct", "-n", "-P", "-j", job, "-o", "JobID,NTasks").splitlines()
        if line.strip()
    )
    assert steps[f"{job}.0"] == "2"


def test_scancel_ends_a_running_job_as_cancelled(tmp_path: Path) -> None:
    job = sbatch("-o", str(tmp_path / "sleep.out"), "--wrap", "sleep 60")
    wait_squeue(job, "RUNNING")
    start = time.monotonic()
    run("scancel", job)
    assert wait_sacct(job, "CANCELLED", "COMPLETED", "FAILED").startswith("CANCELLED")
    assert time.monotonic() - start < 30  # ended by scancel, not by sleep 60 running out
    assert wait_squeue(job, "CANCELLED") == "CANCELLED"


def test_submitit_runs_a_function(tmp_path: Path) -> None:
    import submitit

    def forty_two() -> int:  # local, so cloudpickle sends it by value to the job
        return 42

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5)
    job = executor.submit(forty_two)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        assert time.monotonic() < deadline, f"submitit job {job.job_id} not done: {job.state}"
        time.sleep(0.2)
    assert job.result() == 42
    assert wait_sacct(job.job_id, "COMPLETED", "FAILED", "CANCELLED") == "COMPLETED"
