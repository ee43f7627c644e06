"""The workflow's overhead: a small run's wall time against the sum of its jobs', locally and on a SLURM cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.report import REPO, Report


def slurm_jobs(folder: Path) -> int:
    """How many SLURM jobs (sbatch calls: a job array counts once) ran in ``folder``, training blocks included."""
    rows = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1days", "-o", "JobID,WorkDir%400"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return len({row.split("|")[0].split("_")[0] for row in rows if row.split("|")[1] == str(folder)})


def snakemake(folder: Path, config: dict, options: list[str], targets: list[str]) -> float:
    """The wall time of Snakemake making ``targets`` of this repository's workflow with ``config`` in a new
    ``folder``."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    tick = time.perf_counter()
    run = subprocess.run([*command, *options, *targets], cwd=folder, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"snakemake failed in {folder}:\n{run.stderr[-3000:]}")
    return time.perf_counter() - tick


def workflow_case(report: Report, work: Path, quick: bool, slurm: bool) -> None:
    """Snakemake's wall time against the sum of its jobs' in-job times (their benchmark files), jobs run serially:
    ``--cores 1`` locally; on SLURM the profile's settings (job arrays need several jobs at once), every job taking
    the whole 2-CPU node."""
    config = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    targets = []
    if quick:  # the first two jobs only: manifest (100 images) and init
        config["methods"]["deepercluster"]["rounds"], config["data"]["max_images"] = 1, 100
        targets = ["results/data/manifest.parquet", "results/rounds/0/checkpoint.pt"]
    folder = work / ("workflow-slurm" if slurm else "workflow")
    where = ["--profile", str(REPO / "profiles" / "slurm"), "--slurm-init-seconds-before-status-checks", "1"]
    wall = snakemake(folder, config, where if slurm else ["--cores", "1"], targets)
    jobs = list((folder / "results" / "benchmarks").rglob("*.tsv"))
    in_job = sum(float(pd.read_csv(path, sep="\t")["s"].sum()) for path in jobs)
    where = "SLURM" if slurm else "local"
    rounds = config["methods"]["deepercluster"]["rounds"]
    sizes = f"{config['data']['max_images']} images, {rounds} round(s), {len(jobs)} jobs, 1 at a time"
    if slurm:
        sizes += f" ({slurm_jobs(folder)} SLURM jobs)"
    report.add(
        f"workflow overhead ({where})", sizes, f"{wall:.1f} s wall", f"{in_job:.1f} s in jobs", wall / in_job, "<=", 1.1
    )
    report.figure(f"per-job overhead ({where})", f"{(wall - in_job) / len(jobs):.2f} s")
