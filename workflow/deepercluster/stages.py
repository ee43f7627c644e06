"""Every workflow stage, by the name the rules call it: ``python -m deepercluster <stage> --arg ...``.

Stages are named as ``module:function`` and imported on demand, so a stage pays only for
the libraries it uses (torch, faiss and scikit-learn take seconds to import). ``options``
writes a stage's keyword arguments as the command-line options its parser reads back.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shlex
from collections.abc import Callable

STAGES = {
    "manifest": "deepercluster.data.manifest:build_manifest",
    "init": "deepercluster.checkpoints:initial_checkpoint",
    "features": "deepercluster.features:extract_features",
    "pca": "deepercluster.cluster.pca:fit_pca",
    "super-clusters": "deepercluster.cluster.levels:cluster_super",
    "sub-clusters": "deepercluster.cluster.levels:cluster_sub",
    "labels": "deepercluster.cluster.labels:make_labels",
    "true-labels": "deepercluster.cluster.labels:true_labels",
    "train": "deepercluster.launch:train",
    "summary": "deepercluster.report.summary:summarize",
    "report-round": "deepercluster.report.figures:round_figures",
    "import-checkpoint": "deepercluster.evaluate.external:import_checkpoint",
    "eval-manifest": "deepercluster.data.manifest:join_evaluation",
    "eval-features": "deepercluster.features:extract_all",
    "eval-kmeans": "deepercluster.cluster.levels:cluster_flat",
    "eval-probe-features": "deepercluster.evaluate.linear:probe_features",
    "eval-linear": "deepercluster.evaluate.linear:linear_probe",
    "eval-knn": "deepercluster.evaluate.knn:knn",
    "eval-nmi": "deepercluster.evaluate.nmi:cluster_nmi",
    "eval-clusters": "deepercluster.evaluate.clusters:cluster_grid",
    "eval-similarity": "deepercluster.evaluate.similarity:similarity",
    "eval-voc07": "deepercluster.evaluate.voc07:voc07",
    "eval-retrieval": "deepercluster.evaluate.retrieval:retrieval",
    "compare": "deepercluster.evaluate.compare:compare",
    "export": "deepercluster.report.export:export_model",
    "curate": "deepercluster.data.curate:curate",
    "curation-figures": "deepercluster.report.curation:curation_figures",
}

# Stages that forward their other keyword arguments to another function, whose options they take too.
FORWARDED = {"train": "deepercluster.train.block:train_block"}


def load_stage(name: str) -> Callable[..., None]:
    """The function of stage ``name``; an unknown name raises ``ValueError`` listing the stages."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    return import_function(STAGES[name])


def import_function(qualified: str) -> Callable[..., None]:
    module, function = qualified.split(":")
    return getattr(importlib.import_module(module), function)


def stage_options(name: str) -> list[Callable[..., None]]:
    """The functions whose keyword arguments are stage ``name``'s options."""
    return [load_stage(name), *([import_function(FORWARDED[name])] if name in FORWARDED else [])]


def options(**values: object) -> str:
    """Keyword arguments as a stage's command-line options: --name value, --flag/--no-flag, a list as
    --name v1 v2 ..., a dict or a record (a dataclass) as --name '{json}'; None is left out (the stage's None)."""
    words = []
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict) or dataclasses.is_dataclass(value):
            words += [flag, json.dumps(value if isinstance(value, dict) else dataclasses.asdict(value))]
        elif value is not None:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)
