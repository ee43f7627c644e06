"""Checkpoints registered under ``checkpoints:``: ours as they are, or a foreign plain state dict wrapped.

A foreign checkpoint is a plain ``state_dict`` (torchvision style) whose keys are our model's
``features.*`` and ``classifier.*`` for the same architecture; the config entry names its
``arch`` and ``sobel``. Common wrappings are undone by name: a ``state_dict`` entry around
it, ``module.`` prefixes (DataParallel), a ``top_layer.*`` training head (DeepCluster's), and
``sobel.0``/``sobel.1`` for our ``sobel.grayscale``/``sobel.sobel``. The Sobel filter is fixed,
so a state dict without it gets ours. Every other key must match exactly.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch

from deepercluster.checkpoints import (
    CHECK,
    load_checkpoint,
    load_model,
    model_checkpoint,
    require_finite_weights,
    save_checkpoint,
)
from deepercluster.errors import CheckpointError
from deepercluster.files import atomic_output, sha256
from deepercluster.nn.models import build_model

log = logging.getLogger(__name__)

OURS = {"arch", "sobel", "model"}
RENAMED = {"sobel.0.": "sobel.grayscale.", "sobel.1.": "sobel.sobel."}
HEAD_PREFIX = "top_layer."


def wrap_state_dict(state_dict: dict[str, torch.Tensor], *, arch: str, sobel: bool, source: str) -> dict[str, Any]:
    """Our model checkpoint (``checkpoints.model_checkpoint``) around a plain state dict of ``arch``; its
    provenance is the source file and its sha256."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    weights = {}
    for key, value in state_dict.items():
        key = key.replace("module.", "")
        for old, new in RENAMED.items():
            key = new + key.removeprefix(old) if key.startswith(old) else key
        if not key.startswith(HEAD_PREFIX):
            weights[key] = value
    dropped = sorted(k for k in state_dict if k.replace("module.", "").startswith(HEAD_PREFIX))
    if dropped:
        log.info("%s: left out the training head %s", source, ", ".join(dropped))
    model = build_model(arch, sobel)
    if sobel:
        weights = {**{k: v for k, v in model.state_dict().items() if k.startswith("sobel.")}, **weights}
    differences = state_dict_differences(model.state_dict(), weights)
    if differences:
        raise CheckpointError(
            f"{source} is not a state dict of {arch} with sobel={sobel} ({differences}): "
            "check checkpoints.<name>.arch and .sobel in the config"
        )
    model.load_state_dict(weights, strict=True)
    provenance = {"source": source, "source_sha256": sha256(source)}
    return model_checkpoint(arch=arch, sobel=sobel, round=None, model=model.state_dict(), provenance=provenance)


def state_dict_differences(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """How ``given`` differs from ``expected`` in a few words: counts and the first key of each kind; '' if it fits."""
    kinds = {
        "missing": sorted(set(expected) - set(given)),
        "unexpected": sorted(set(given) - set(expected)),
        "of another shape": sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape),
    }
    return ", ".join(f"{len(keys)} keys {kind}, e.g. {keys[0]}" for kind, keys in kinds.items() if keys)


def import_checkpoint(*, source: str, out: str, arch: str | None, sobel: bool) -> None:
    """Stage 'import-checkpoint': ``out`` = ``source`` if it is ours, else ``source`` as a plain state dict of
    ``arch`` (with ``sobel``) in our format. Given ``arch``, one of ours must have that arch and ``sobel``."""
    state = load_checkpoint(source, CHECK)
    if isinstance(state, dict) and set(state) >= OURS:
        load_model(source)  # every key must fit its own arch
        if arch is not None and (state["arch"], state["sobel"]) != (arch, sobel):
            raise CheckpointError(
                f"{source} is a {state['arch']} with sobel={state['sobel']}, its checkpoints entry says {arch} "
                f"with sobel={sobel}: fix or remove arch and sobel there"
            )
        log.info("%s is a deepercluster checkpoint (%s, sobel=%s): copied", source, state["arch"], state["sobel"])
        with atomic_output(out) as partial:
            shutil.copyfile(source, partial)
        return
    if arch is None or not isinstance(state, dict):
        raise CheckpointError(
            f"{source} is not a deepercluster checkpoint (no {sorted(OURS)} keys): to use it as a plain "
            "state dict, give its arch and sobel in its checkpoints entry ({path: ..., arch: ..., sobel: ...})"
        )
    wrapped = wrap_state_dict(state, arch=arch, sobel=sobel, source=source)
    require_finite_weights(source, wrapped)
    log.info("%s: a plain %s state dict (sobel=%s), %d tensors", source, arch, sobel, len(wrapped["model"]))
    save_checkpoint(out, wrapped)
