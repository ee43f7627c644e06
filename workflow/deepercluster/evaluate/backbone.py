"""What the evaluations share around the network: the frozen backbone of a checkpoint, its conv
activations, the pooling of linear probes, and a labelled train/val split of a manifest."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from deepercluster.checkpoints import load_model
from deepercluster.data.images import ImageDataset
from deepercluster.errors import EvaluationError
from deepercluster.formats.manifest import read_manifest
from deepercluster.nn.models import ConvNet

PROBE_MAX_DIM = 10_000  # linear probes read conv activations average-pooled below this dimension


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_backbone(checkpoint: str) -> tuple[ConvNet, dict[str, Any]]:
    """(model in eval mode with no trainable parameter, checkpoint) on the evaluation device."""
    model, state = load_model(checkpoint)
    for parameter in model.parameters():
        parameter.requires_grad = False
    return model.to(device()).eval(), state


def layer_names(model: ConvNet) -> list[str]:
    """conv1, conv2, ...: one name per conv layer, in order."""
    return [f"conv{i + 1}" for i in range(len(model.conv_layers()))]


def conv_activations(model: ConvNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of the ReLU after each conv (``ConvNet.conv_layers``) for images ``x``; the classifier is skipped."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in model.conv_layers()]
    try:
        model.features(x if model.sobel is None else model.sobel(x))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def probe_pool_size(channels: int, height: int, max_dim: int = PROBE_MAX_DIM) -> int:
    """The largest side s <= ``height`` with channels * s * s < ``max_dim``: REFERENCE's VGG-16 and AlexNet dims."""
    return max(1, min(height, math.isqrt((max_dim - 1) // channels)))


@dataclass(frozen=True)
class LabelledSet:
    """The labelled images of an evaluation manifest: its train images (the probes learn from them, the k-NN
    remembers them) and its test images (every evaluation scores them)."""

    ids: np.ndarray  # [n] int64, manifest ids
    targets: np.ndarray  # [n] int64, index into classes
    classes: list[str]
    train: np.ndarray  # [n] bool: a train image (else a test image)


def labelled_roles(manifest: str, label_column: str) -> LabelledSet:
    """The evaluation manifest's images with a ``label_column`` value, by role (its ``eval_split`` column)."""
    frame = read_manifest(manifest)
    if label_column not in frame.columns or "eval_split" not in frame.columns:
        raise EvaluationError(
            f"{manifest} has no column {label_column!r} or eval_split (it has {', '.join(map(str, frame.columns))}): "
            "set evaluation.label_column to the column of class labels, and evaluate on the eval-manifest stage's "
            "manifest"
        )
    frame = frame[frame[label_column].notna()].reset_index(drop=True)
    labels = frame[label_column].astype(str)
    classes = sorted(labels.unique())
    train = (frame["eval_split"] == "train").to_numpy()
    if len(classes) < 2 or train.all() or not train.any():
        raise EvaluationError(
            f"{manifest}: {train.sum()} labelled train and {(~train).sum()} test images in {len(classes)} classes; "
            "label train and test images of 2 classes or more (evaluation.train_data, evaluation.data)"
        )
    targets = pd.Categorical(labels, categories=classes).codes.astype(np.int64)
    return LabelledSet(frame["id"].to_numpy(np.int64), targets, classes, train)


def image_loader(
    images: ImageDataset, batch_size: int, workers: int = 0, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """(images, ids) batches of ``images``; shuffled with its own seeded generator."""
    return DataLoader(
        images,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=device().type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
