"""Linear probes on every conv layer of a frozen backbone (DeeperCluster Figure 2, DeepCluster Table 1).

Each conv layer's ReLU output is average-pooled to s x s with channels * s * s below 10,000
(VGG-16: 9216, 9216, 8192, 8192, 9216 x 3, 8192 x 6; AlexNet: 9600, 9216, 9600, 9600, 9216)
and fed to its own linear classifier. The backbone is in eval mode (BatchNorm frozen) and
receives no gradient; all classifiers train together with SGD and the learning rate
lr0 / sqrt(1 + lr0 * weight_decay * t) at iteration t. Images are centre crops.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepercluster.data import feature_transform
from deepercluster.evaluate.backbone import (
    conv_activations,
    device,
    frozen_backbone,
    image_loader,
    labelled_split,
    layer_names,
    probe_pool_size,
)
from deepercluster.evaluate.common import accuracy_figure, save_figure, write_json
from deepercluster.files import sha256
from deepercluster.logs import progress
from deepercluster.models import ConvNet

log = logging.getLogger(__name__)


def activation_shapes(model: ConvNet, image_size: int) -> list[tuple[int, int]]:
    """(channels, smaller spatial side) of each conv layer's activation for ``image_size`` inputs."""
    parameter = next(model.parameters())
    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
        return [(a.shape[1], min(a.shape[2:])) for a in conv_activations(model, x)]


class LinearProbes(nn.Module):
    """Per conv layer: AdaptiveAvgPool2d(s) -> flatten -> Linear(channels * s * s, classes)."""

    def __init__(self, shapes: list[tuple[int, int]], classes: int) -> None:
        super().__init__()
        self.pool_sizes = [probe_pool_size(channels, height) for channels, height in shapes]
        self.dims = [channels * s * s for (channels, _), s in zip(shapes, self.pool_sizes, strict=True)]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Flatten(), nn.Linear(dim, classes))
            for s, dim in zip(self.pool_sizes, self.dims, strict=True)
        )

    def forward(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(a) for head, a in zip(self.heads, activations, strict=True)]


def linear_probe(
    *,
    checkpoint: str,
    manifest: str,
    out: str,
    plot: str,
    label_column: str = "label",
    val_fraction: float = 0.2,
    image_size: int = 32,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    workers: int = 0,
) -> None:
    """Stage 'eval-linear': top-1 on the val split of a linear probe per conv layer -> ``out``, ``plot``."""
    data = labelled_split(manifest, label_column, val_fraction, seed)
    model, state = frozen_backbone(checkpoint)
    torch.manual_seed(seed)
    probes = LinearProbes(activation_shapes(model, image_size), len(data.classes)).to(device())
    names = layer_names(model)
    log.info(
        "linear probes on %s (%s): %s pooled dims %s; %d classes of %r",
        checkpoint,
        state["arch"],
        names,
        probes.dims,
        len(data.classes),
        label_column,
    )
    losses = train_probes(
        model, probes, data.part(val=False), image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
        momentum=momentum, weight_decay=weight_decay, seed=seed, workers=workers,
    )  # fmt: skip
    top1 = probe_accuracy(model, probes, data.part(val=True), image_size, batch_size, workers)
    log.info("val top-1 per layer: %s", dict(zip(names, np.round(top1, 4).tolist(), strict=True)))
    layers = [
        {
            "layer": name,
            "pool": s,
            "dim": dim,
            "top1": float(acc),
            "train_loss": [float(epoch[i]) for epoch in losses],
        }
        for i, (name, s, dim, acc) in enumerate(zip(names, probes.pool_sizes, probes.dims, top1, strict=True))
    ]
    write_json(
        out,
        {
            "checkpoint": checkpoint,
            "checkpoint_sha256": sha256(checkpoint),
            "arch": state["arch"],
            "label_column": label_column,
            "classes": len(data.classes),
            "train_images": int((~data.val).sum()),
            "val_images": int(data.val.sum()),
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "layers": layers,
        },
    )
    save_figure(accuracy_figure({Path(out).parent.name: layers}, 1 / len(data.classes)), plot)


def train_probes(
    model: ConvNet,
    probes: LinearProbes,
    split: tuple[list[str], np.ndarray, np.ndarray],
    *,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    workers: int,
) -> list[np.ndarray]:
    """SGD on every probe at once over ``split`` (paths, ids, targets), lr0 / sqrt(1 + lr0 * wd * t) at
    iteration t; the mean train loss of each probe per epoch. The backbone gets no gradient."""
    paths, _, targets = split
    optimizer = torch.optim.SGD(probes.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = image_loader(
        paths, np.arange(len(paths)), feature_transform(image_size), batch_size, workers, shuffle=True, seed=seed
    )
    step, losses_per_epoch = 0, []
    for epoch in range(epochs):
        probes.train()
        sums = np.zeros(len(probes.heads))
        for x, rows in progress(loader, f"linear probes epoch {epoch + 1}/{epochs}", total=len(loader), unit="batch"):
            for group in optimizer.param_groups:
                group["lr"] = lr / math.sqrt(1 + lr * weight_decay * step)
            y = torch.from_numpy(targets[rows.numpy()]).to(device())
            with torch.no_grad():
                activations = conv_activations(model, x.to(device()))
            losses = [F.cross_entropy(logits, y) for logits in probes(activations)]
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            optimizer.step()
            sums += [loss.item() * len(y) for loss in losses]
            step += 1
        losses_per_epoch.append(sums / len(paths))
        log.info("epoch %d/%d: train loss per layer %s", epoch + 1, epochs, np.round(losses_per_epoch[-1], 4).tolist())
    return losses_per_epoch


@torch.no_grad()
def probe_accuracy(
    model: ConvNet,
    probes: LinearProbes,
    split: tuple[list[str], np.ndarray, np.ndarray],
    image_size: int,
    batch_size: int,
    workers: int,
) -> np.ndarray:
    """Top-1 of each probe on ``split`` (paths, ids, targets)."""
    paths, _, targets = split
    probes.eval()
    correct = np.zeros(len(probes.heads))
    loader = image_loader(paths, np.arange(len(paths)), feature_transform(image_size), batch_size, workers)
    for x, rows in progress(loader, "linear probes val", total=len(loader), unit="batch"):
        y = torch.from_numpy(targets[rows.numpy()]).to(device())
        logits = probes(conv_activations(model, x.to(device())))
        correct += [(scores.argmax(1) == y).sum().item() for scores in logits]
    return correct / len(paths)
