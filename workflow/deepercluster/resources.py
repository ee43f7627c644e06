"""What a stage's jobs ask for: the config's ``resources.default``, overridden by ``resources.<stage>``.

The rules take a job's Snakemake resources and threads from here, and the training block's
allocation (submitted by the train stage itself) as options of ``python -m deepercluster train``.
"""

from __future__ import annotations

from typing import Any

from deepercluster.errors import ConfigError
from deepercluster.stages import options
from deepercluster.train.settings import Allocation


def allocation(resources: dict[str, Any], stage: str) -> dict[str, Any]:
    """The resources of ``stage``'s jobs: ``resources.default``, overridden by ``resources.<stage>``."""
    return {**resources["default"], **resources.get(stage, {})}


def stage_threads(resources: dict[str, Any], stage: str) -> int:
    """Threads of a stage's jobs (torch and faiss): its cpus_per_task."""
    return allocation(resources, stage)["cpus_per_task"]


def job_resources(resources: dict[str, Any], stage: str) -> dict[str, Any]:
    """Snakemake resources of a stage's jobs (read by the SLURM executor)."""
    wanted = allocation(resources, stage)
    job = {key: wanted[key] for key in ("runtime", "mem_mb", "cpus_per_task", "tasks", "nodes")}
    if wanted["gpus"]:
        job["gpu"] = wanted["gpus"]
        if wanted["gpu_model"]:
            job["gpu_model"] = wanted["gpu_model"]
    if wanted["tasks"] > 1:
        job["mpi"] = "srun"  # the stage starts its ranks itself (python -m deepercluster --ranks)
    for key in ("slurm_partition", "slurm_account"):
        if wanted[key]:
            job[key] = wanted[key]
    return job


def training_allocation(resources: dict[str, Any]) -> str:
    """The training block's allocation (``resources.train``), as the option of ``python -m deepercluster train``."""
    return options(allocation=Allocation.of(allocation(resources, "train")))


def require_array_fits(rule: str, count: int, array_jobs: str | None, jobs: int | None) -> None:
    """Refuse a job array that snakemake-executor-plugin-slurm 2.8 would never submit.

    With ``slurm-array-jobs`` naming ``rule``, the plugin submits the rule's ready jobs as one array only when
    Snakemake hands it all of them at once (or a whole array chunk); the others stay "running" forever. So a
    round's ``count`` jobs of the rule must fit in ``jobs`` (snakemake's ``--jobs``).
    """
    arrays = {name.strip() for name in (array_jobs or "").replace(";", ",").split(",")}
    if ({rule, "all"} & arrays) and jobs is not None and count > jobs:
        raise ConfigError(
            f"profiles/slurm/config.yaml: slurm-array-jobs includes {rule}, which has {count} jobs per round, more "
            f"than jobs ({jobs}): the SLURM plugin would wait forever; raise jobs to at least {count}, or drop "
            f"{rule} from slurm-array-jobs"
        )
