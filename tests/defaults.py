"""Each stage's settings as the rules pass them, from the schema's defaults (the one place defaults live), for the
tests that call stage functions directly; keyword arguments change any of them."""

from __future__ import annotations

from typing import Any

from deepercluster.config import validate_config

CONFIG = validate_config({})


def manifest_settings(**changes: Any) -> dict[str, Any]:
    data = CONFIG["data"]
    keys = ("max_images", "label_from_folder", "path_column", "split", "uncurated", "verify_images")
    return {"seed": CONFIG["seed"], "workers": 0, **{key: data[key] for key in keys}, **changes}


def feature_settings(**changes: Any) -> dict[str, Any]:
    """The settings of a stage that runs the frozen backbone over images (features of all images, probes...)."""
    return {"image_size": CONFIG["data"]["image_size"], "batch_size": CONFIG["features"]["batch_size"], "workers": 0,
            **changes}  # fmt: skip


def shard_settings(**changes: Any) -> dict[str, Any]:
    """The features stage's settings: those of ``feature_settings`` and the shards' dtype."""
    return feature_settings(**{"dtype": CONFIG["features"]["dtype"], **changes})


def pca_settings(**changes: Any) -> dict[str, Any]:
    """The pca stage's settings: every direction kept (DeeperCluster's), unless ``dim`` or ``fraction`` say."""
    pca = CONFIG["pca"]
    return {"dim": None, "fraction": CONFIG["methods"]["deepercluster"]["pca_fraction"],
            "sample_size": pca["sample_size"], "eigenvalue_floor": pca["eigenvalue_floor"], "seed": CONFIG["seed"],
            **changes}  # fmt: skip


def kmeans_settings(**changes: Any) -> dict[str, Any]:
    kmeans = CONFIG["kmeans"]
    keys = ("iterations", "cache_mb", "dtype")
    return {**{key: kmeans[key] for key in keys}, "seed": CONFIG["seed"], **changes}


def block_settings(method: str = "deepercluster", **changes: Any) -> dict[str, Any]:
    """The training block's settings (``train_block``'s) for ``method``, one process, no DataLoader workers."""
    train, own = CONFIG["train"], CONFIG["methods"][method]
    keys = ("batch_size", "momentum", "weight_decay", "dropout", "min_crop_scale", "checkpoint_every")
    return {"epochs": own["epochs_per_round"], "lr": own["lr"], "head_momentum": own["head_momentum"],
            **{key: train[key] for key in keys}, "image_size": CONFIG["data"]["image_size"], "workers": 0,
            "seed": CONFIG["seed"], **changes}  # fmt: skip


def allocation_settings(**changes: Any) -> dict[str, Any]:
    """The training block's allocation (``launch.train``'s), ``resources.train`` of the schema's defaults."""
    wanted = CONFIG["resources"]["default"]
    return {"launcher": CONFIG["launcher"], "tasks": wanted["tasks"], "nodes": wanted["nodes"],
            "gpus_per_node": wanted["gpus"], "gpu_model": wanted["gpu_model"], "cpus_per_task": wanted["cpus_per_task"],
            "mem_mb": wanted["mem_mb"], "timeout_min": wanted["runtime"], "slurm_partition": wanted["slurm_partition"],
            "slurm_account": wanted["slurm_account"], **changes}  # fmt: skip


def eval_settings(**changes: Any) -> dict[str, Any]:
    """evaluation.* of the schema's defaults, by key."""
    return {**CONFIG["evaluation"], **changes}
