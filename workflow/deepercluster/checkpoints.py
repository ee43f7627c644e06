"""Every checkpoint file: dicts with fixed keys, restored strictly by name, saved atomically. One layout:

- a model checkpoint (a round's ``checkpoint.pt``, round 0's, a registered checkpoint's copy):
  ``arch``, ``sobel``, ``round``, ``model`` (the backbone's state dict), what the block adds (``heads``,
  ``targets``), and ``provenance``, a dict of what it was made from (its inputs' sha256, its settings);
- a training block's state (``train/last.pt`` and its group files): the state dict of each object under the
  name it is restored by (``model``, ``super_class``, ``optimizer``...), ``rng``, ``epoch``, ``batch`` and the
  same ``provenance``;
- an export (``export/{name}.pth``): ``state_dict``, ``arch``, ``folded_sobel``, ``feature_dim``, ``image_size``,
  ``mean``, ``std`` and ``provenance``.

They hold plain data only (dicts, lists, tensors, numbers, strings) and are loaded with
``weights_only=True``: a file holding any other Python object is refused, never unpickled,
so loading a checkpoint, ours or a foreign one, cannot run code. A model checkpoint written before
provenance was nested (its keys at the top level) is read as if it were.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any

import torch

from deepercluster.errors import CheckpointError
from deepercluster.files import atomic_output
from deepercluster.nn.models import ConvNet, build_model

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save`` to memory, then the bytes written atomically: the live checkpoint is never half-written, and
    the archive holds no temporary name (torch records the name of the file it writes in it), so the same state
    always gives the same bytes and sha256."""
    archive = io.BytesIO()
    torch.save(state, archive)
    with atomic_output(path) as partial:
        partial.write_bytes(archive.getbuffer())


# The fix of an unreadable checkpoint: one of ours is remade; the user's own (under checkpoints:) not.
REMAKE = "delete it and rerun the stage that makes it"
CHECK = "check its path under checkpoints: in the config, or the file itself"


def load_checkpoint(path: str | os.PathLike, fix: str = REMAKE) -> dict[str, Any]:
    """Load a checkpoint on the CPU, with one clear message when it is missing or unreadable (``fix``: what to
    do then, ``REMAKE`` for our outputs, ``CHECK`` for the user's files)."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist: check its path under checkpoints: in the config, or let the "
            "workflow build it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a foreign file, or torch's weights-only unpickler refused an object
        found = " ".join(line for line in str(error).splitlines() if "GLOBAL" in line)
        if not found:
            raise unreadable(path, error, fix) from error
        raise CheckpointError(
            f"checkpoint {path} holds Python objects other than tensors and plain data ({found}): "
            "refused, not unpickled, so that loading cannot run code; if you trust it, save its state dict alone "
            "(torch.save(model.state_dict(), path)) and point the config at that file"
        ) from error
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise unreadable(path, error, fix) from error


def unreadable(path: str | os.PathLike, error: Exception, fix: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); it is truncated or not a PyTorch file: "
        f"{fix}"
    )


MODEL_KEYS = ("arch", "sobel", "round", "model")


def model_checkpoint(
    *, arch: str, sobel: bool, round: int | None, model: dict[str, Any], provenance: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """A model checkpoint's dict: the backbone ``model`` (a state dict) of ``arch``, what the block adds
    (``extra``: heads, targets) and its ``provenance``."""
    return {"arch": arch, "sobel": sobel, "round": round, "model": model, **extra, "provenance": provenance}


def exported_model(
    *,
    state_dict: dict[str, Any],
    arch: str,
    folded_sobel: bool,
    feature_dim: int,
    image_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """An export's dict: the backbone as a plain state dict for supervised training, and how to feed it."""
    return {
        "state_dict": state_dict,
        "arch": arch,
        "folded_sobel": folded_sobel,
        "feature_dim": feature_dim,
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "provenance": provenance,
    }


def provenance_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a model checkpoint was made from: its ``provenance``, or in the older layout every key but the
    model's and the block's."""
    if "provenance" in checkpoint:
        return checkpoint["provenance"]
    return {k: v for k, v in checkpoint.items() if k not in {*MODEL_KEYS, "heads", "targets"}}


def non_finite_weights(state: Any, name: str = "") -> list[str]:
    """The names (``model.features.0.weight``...) of the floating-point tensors in ``state``, nested in dicts and
    lists as a checkpoint's are, that hold a NaN or an infinity (their minimum or maximum is not finite: one pass,
    20 times faster than ``isfinite`` on the CPU)."""
    if isinstance(state, torch.Tensor):
        if not state.is_floating_point() or not state.numel():
            return []
        return [] if bool(torch.isfinite(torch.stack(torch.aminmax(state.detach()))).all()) else [name]
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    return [found for key, value in items for found in non_finite_weights(value, f"{name}.{key}".lstrip("."))]


def require_finite_weights(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Refuse a model checkpoint holding a NaN or an infinity (weights, heads, optimiser state), naming the round
    and the learning rate that made it when a training block did, and the fix."""
    bad = non_finite_weights(checkpoint)
    if not bad:
        return
    provenance = provenance_of(checkpoint)
    method, lr = provenance.get("method"), provenance.get("lr")
    made = (
        f"round {checkpoint.get('round')}'s {method} training block made it with lr {lr} and diverged: lower "
        f"methods.{method}.lr and rerun snakemake, which retrains the rounds that change"
        if method and lr
        else "it cannot be trained or evaluated: check the file (under checkpoints: in the config)"
    )
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    raise CheckpointError(f"checkpoint {path} holds NaN or infinite values in {', '.join(bad[:3])}{more}: {made}")


def load_model(path: str | os.PathLike, fix: str = REMAKE) -> tuple[ConvNet, dict[str, Any]]:
    """(backbone, checkpoint) of a model checkpoint, restored strictly: every key must match by name (``fix``: as
    ``load_checkpoint``'s)."""
    checkpoint = load_checkpoint(path, fix)
    missing = {"arch", "sobel", "model"} - set(checkpoint)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}: it was not written by deepercluster")
    require_finite_weights(path, checkpoint)
    model = build_model(checkpoint["arch"], checkpoint["sobel"])
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit {checkpoint['arch']}: {error}") from error
    return model, checkpoint


def initial_checkpoint(*, arch: str, sobel: bool, seed: int, out: str) -> None:
    """Stage 'init': round 0's checkpoint, a seeded random init (a registered start is imported apart:
    ``evaluate.external.import_checkpoint``)."""
    torch.manual_seed(seed)
    model = build_model(arch, sobel)
    log.info("round 0 is a random %s (sobel=%s, seed %d)", arch, sobel, seed)
    save_checkpoint(
        out, model_checkpoint(arch=arch, sobel=sobel, round=0, model=model.state_dict(), provenance={"seed": seed})
    )
