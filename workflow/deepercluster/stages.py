"""Every workflow stage, by the name the rules call it: ``python -m deepercluster <stage> --arg ...``.

Stages are named as ``module:function`` and imported on demand, so a stage pays only for
the libraries it uses (torch, faiss and scikit-learn take seconds to import).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = {
    "manifest": "deepercluster.data:build_manifest",
    "init": "deepercluster.checkpoints:initial_checkpoint",
    "features": "deepercluster.features:extract_features",
    "pca": "deepercluster.pca:fit_pca",
    "super-clusters": "deepercluster.cluster:cluster_super",
    "sub-clusters": "deepercluster.cluster:cluster_sub",
    "labels": "deepercluster.labels:make_labels",
}


def load_stage(name: str) -> Callable[..., None]:
    """The function of stage ``name``; an unknown name raises ``ValueError`` listing the stages."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    module, function = STAGES[name].split(":")
    return getattr(importlib.import_module(module), function)
