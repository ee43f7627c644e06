"""Each stage's settings as the rules pass them, from the schema's defaults (the one place defaults live), for the
tests that call stage functions directly; keyword arguments change any of them."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, fields
from typing import Any

from deepercluster.config import validate_config
from deepercluster.stages import options
from deepercluster.train.settings import Allocation, BlockSettings

CONFIG = validate_config({})


def manifest_settings(**changes: Any) -> dict[str, Any]:
    data = CONFIG["data"]
    keys = ("max_images", "label_from_folder", "path_column", "split", "uncurated", "verify_images")
    return {"seed": CONFIG["seed"], "workers": 0, **{key: data[key] for key in keys}, **changes}


def manifest_command(**changes: Any) -> list[str]:
    """The manifest stage's command-line words (after ``python -m deepercluster``) of ``manifest_settings``."""
    return ["manifest", *shlex.split(options(**manifest_settings(**changes)))]


def feature_settings(**changes: Any) -> dict[str, Any]:
    """The settings of a stage that runs the frozen backbone over images (features of all images, probes...)."""
    return {
        "image_size": CONFIG["data"]["image_size"],
        "batch_size": CONFIG["features"]["batch_size"],
        "workers": 0,
        **changes,
    }


def shard_settings(**changes: Any) -> dict[str, Any]:
    """The features stage's settings: those of ``feature_settings`` and the shards' dtype."""
    return feature_settings(**{"dtype": CONFIG["features"]["dtype"], **changes})


def pca_settings(**changes: Any) -> dict[str, Any]:
    """The pca stage's settings: every direction kept (DeeperCluster's), unless ``dim`` or ``fraction`` say."""
    pca = CONFIG["pca"]
    return {
        "dim": None,
        "fraction": CONFIG["methods"]["deepercluster"]["pca_fraction"],
        "sample_size": pca["sample_size"],
        "eigenvalue_floor": pca["eigenvalue_floor"],
        "seed": CONFIG["seed"],
        **changes,
    }


def kmeans_settings(**changes: Any) -> dict[str, Any]:
    kmeans = CONFIG["kmeans"]
    keys = ("iterations", "cache_mb", "dtype")
    return {**{key: kmeans[key] for key in keys}, "seed": CONFIG["seed"], **changes}


def block_settings(method: str = "deepercluster", **changes: Any) -> dict[str, Any]:
    """The training block's settings for ``method``: the fields of ``BlockSettings.of`` the schema's defaults (seed
    the config's), one process's ``workers`` (none) and ``checkpoint_every``, flat so that a test changes any;
    ``packed`` makes them ``train_block``'s arguments."""
    settings = asdict(BlockSettings.of(CONFIG, CONFIG["methods"][method], CONFIG["seed"]))
    return {**settings, "workers": 0, "checkpoint_every": CONFIG["train"]["checkpoint_every"], **changes}


def allocation_settings(**changes: Any) -> dict[str, Any]:
    """The training block's launcher and allocation (``resources.train`` of the schema's defaults), flat."""
    allocation = asdict(Allocation.of(CONFIG["resources"]["default"]))
    return {"launcher": CONFIG["launcher"], **allocation, **changes}


def packed(arguments: dict[str, Any]) -> dict[str, Any]:
    """Flat ``arguments`` as ``train_block`` and ``launch.train`` take them: the fields of ``BlockSettings`` as
    ``settings``, those of ``Allocation`` (where there are any) as ``allocation``."""
    records = {"settings": BlockSettings, "allocation": Allocation}
    names = {key: {f.name for f in fields(record)} for key, record in records.items()}
    out = {name: value for name, value in arguments.items() if not any(name in n for n in names.values())}
    for key, record in records.items():
        if names[key] & arguments.keys():
            out[key] = record(**{name: arguments[name] for name in names[key]})
    return out


def run_block(**arguments: Any) -> None:
    """``train_block`` of flat ``arguments`` (``packed``)."""
    from deepercluster.train.block import train_block

    train_block(**packed(arguments))


def run_train(**arguments: Any) -> None:
    """``launch.train`` (the train stage) of flat ``arguments`` (``packed``)."""
    from deepercluster.launch import train

    train(**packed(arguments))


def train_command(arguments: dict[str, Any]) -> list[str]:
    """The train stage's command line of flat ``arguments`` (``packed``), as the rule runs it."""
    return [sys.executable, "-m", "deepercluster", "train", *shlex.split(options(**packed(arguments)))]


def eval_settings(**changes: Any) -> dict[str, Any]:
    """evaluation.* of the schema's defaults, by key."""
    return {**CONFIG["evaluation"], **changes}
