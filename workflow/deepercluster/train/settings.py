"""A training block's settings and allocation, each one typed record from the config to the block.

``BlockSettings`` is what a block's weights depend on besides its input files, its method and its ranks: the
provenance that ``last.pt`` is checked against before it is resumed (``state.block_provenance``). ``Allocation``
is what the block's job asks for (``resources.train``). The train rule passes each as one option (JSON, read
back by the CLI into the record), ``launch.train`` submits with the allocation, ``train_block`` trains with the
settings. Torch-free: Snakemake imports it when it parses the workflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockSettings:
    """The block's ``epochs`` on a global batch of ``batch_size`` images (split over the ranks) of crops of
    ``image_size`` px (at least ``min_crop_scale`` of the image); SGD at ``lr`` with ``momentum`` on the backbone,
    ``head_momentum`` on the heads, ``weight_decay`` on both; the backbone's ``dropout``; the round's ``seed``."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    head_momentum: float
    weight_decay: float
    dropout: float
    image_size: int
    min_crop_scale: float
    seed: int

    @classmethod
    def of(cls, config: dict[str, Any], own: dict[str, Any], seed: int) -> BlockSettings:
        """The settings of a block in a validated ``config``: its run's method's ``own`` (``methods.<method>``, as
        ``Plan.settings`` gives them), ``train`` and ``data.image_size``, with the round's ``seed``."""
        train = config["train"]
        return cls(
            epochs=own["epochs_per_round"],
            batch_size=train["batch_size"],
            lr=own["lr"],
            momentum=train["momentum"],
            head_momentum=own["head_momentum"],
            weight_decay=train["weight_decay"],
            dropout=train["dropout"],
            image_size=config["data"]["image_size"],
            min_crop_scale=train["min_crop_scale"],
            seed=seed,
        )


@dataclass(frozen=True)
class Allocation:
    """The block's job: ``tasks`` ranks on ``nodes`` nodes (``tasks`` a multiple of it), ``gpus_per_node`` GPUs
    (of ``gpu_model``, None: any), ``cpus_per_task`` CPU cores (the torch threads of each rank), ``mem_mb`` of
    memory (None: the cluster's default), ``timeout_min`` minutes, and the SLURM partition and account."""

    tasks: int
    nodes: int
    gpus_per_node: int
    gpu_model: str | None
    cpus_per_task: int
    mem_mb: int | None
    timeout_min: int
    slurm_partition: str | None
    slurm_account: str | None

    @classmethod
    def of(cls, wanted: dict[str, Any]) -> Allocation:
        """The allocation of a stage's resources as the config names them (``deepercluster.resources.allocation``)."""
        return cls(
            tasks=wanted["tasks"],
            nodes=wanted["nodes"],
            gpus_per_node=wanted["gpus"],
            gpu_model=wanted["gpu_model"],
            cpus_per_task=wanted["cpus_per_task"],
            mem_mb=wanted["mem_mb"],
            timeout_min=wanted["runtime"],
            slurm_partition=wanted["slurm_partition"],
            slurm_account=wanted["slurm_account"],
        )
