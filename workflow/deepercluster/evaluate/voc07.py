"""Pascal VOC 2007 multi-label classification (DeepCluster Table 4, DeeperCluster Table 3).

A VOC-layout folder: ``JPEGImages/{image}.jpg`` and ``ImageSets/Main/{class}_{split}.txt``
with one line ``{image} {1|-1|0}`` per image (1 present, -1 absent, 0 difficult: left out
of both the loss and the AP of that class). Classifiers train on trainval (``{class}_trainval.txt``,
else train and val together) and are scored on test, in two settings from the same checkpoint:

- ``fc6_8``: the convs frozen (BatchNorm too); the backbone's two FC layers (fc6, fc7) and a
  new fc8 are trained;
- ``all``: every layer is fine-tuned (the Sobel filter stays fixed).

Binary cross-entropy per class; random resized crops and flips in training; at test the
sigmoid scores of 10 random crops are averaged. The score is the AP of each class on test and
their mean (mAP).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from deepercluster.checkpoints import load_model
from deepercluster.data.images import ImageDataset, network_input, train_transform
from deepercluster.errors import EvaluationError
from deepercluster.evaluate.backbone import device, image_loader
from deepercluster.evaluate.common import average_precision
from deepercluster.files import sha256
from deepercluster.formats.evals import write_json
from deepercluster.logs import progress
from deepercluster.nn.heads import linear_head
from deepercluster.nn.models import ConvNet
from deepercluster.seeds import derived_seed

log = logging.getLogger(__name__)

SETTINGS = ("fc6_8", "all")
TEST_CROPS = 10
MOMENTUM = 0.9


def read_split(voc: str, split: str) -> pd.DataFrame:
    """Labels (1, -1, 0) of ``split``: one row per image, one column per class, classes sorted."""
    main = Path(voc) / "ImageSets" / "Main"
    files = sorted(main.glob(f"*_{split}.txt"))
    if not files:
        raise EvaluationError(f"{main} has no *_{split}.txt file: evaluation.voc07 must be a VOC-layout folder")
    columns = [
        pd.read_csv(
            path, sep=r"\s+", header=None, names=["image", path.stem.removesuffix(f"_{split}")], dtype={"image": str}
        ).set_index("image")
        for path in files
    ]
    return pd.concat(columns, axis=1).sort_index().fillna(0).astype(np.int64)


def read_voc(voc: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trainval, test) label tables with the same class columns."""
    main = Path(voc) / "ImageSets" / "Main"
    if any(main.glob("*_trainval.txt")):
        trainval = read_split(voc, "trainval")
    else:
        trainval = pd.concat([read_split(voc, "train"), read_split(voc, "val")])
    test = read_split(voc, "test")
    if list(trainval.columns) != list(test.columns):
        raise EvaluationError(
            f"{main}: the classes of trainval {list(trainval.columns)} and test {list(test.columns)} differ"
        )
    return trainval, test


def image_paths(voc: str, labels: pd.DataFrame) -> list[str]:
    return [str(Path(voc) / "JPEGImages" / f"{image}.jpg") for image in labels.index]


def set_trainable(model: ConvNet, setting: str) -> list[torch.nn.Parameter]:
    """Freeze what ``setting`` keeps fixed; the parameters it trains. The Sobel filter never trains."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown VOC07 setting {setting!r}; valid: {', '.join(SETTINGS)}")
    if setting == "fc6_8":
        for parameter in model.features.parameters():
            parameter.requires_grad = False
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: ConvNet, setting: str) -> None:
    """``all``: everything in training mode; ``fc6_8``: only the classifier (BatchNorm of the convs frozen)."""
    model.eval()
    (model if setting == "all" else model.classifier).train()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the (image, class) pairs that are not difficult (target 0)."""
    known = (targets != 0).float()
    loss = F.binary_cross_entropy_with_logits(logits, (targets > 0).float(), weight=known, reduction="sum")
    return loss / known.sum().clamp(min=1)


def fine_tune(
    checkpoint: str,
    setting: str,
    paths: list[str],
    targets: np.ndarray,
    *,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    workers: int,
) -> tuple[ConvNet, torch.nn.Module]:
    """The checkpoint's model and a new fc8 trained on (``paths``, ``targets``) in ``setting``."""
    model, _ = load_model(checkpoint)
    torch.manual_seed(seed)
    head = linear_head(model.feature_dim, targets.shape[1])
    model.to(device())
    head.to(device())
    parameters = [*set_trainable(model, setting), *head.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    transform = train_transform(image_size)
    loader = image_loader(ImageDataset.of_files(paths, transform), batch_size, workers, shuffle=True, seed=seed)
    labels = torch.from_numpy(targets)
    for epoch in range(epochs):
        train_mode(model, setting)
        head.train()
        total = 0.0
        for x, rows in progress(loader, f"voc07 {setting} epoch {epoch + 1}/{epochs}", total=len(loader), unit="batch"):
            loss = masked_bce(head(model(network_input(x, device()))), labels[rows].to(device()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        log.info("voc07 %s epoch %d/%d: loss %.4f", setting, epoch + 1, epochs, total / len(paths))
    return model, head


@torch.no_grad()
def crop_scores(
    model: ConvNet, head: torch.nn.Module, paths: list[str], image_size: int, batch_size: int, seed: int, workers: int
) -> np.ndarray:
    """Sigmoid scores [images, classes] averaged over ``TEST_CROPS`` seeded random crops of each image."""
    model.eval()
    head.eval()
    scores = np.zeros((len(paths), head[-1].out_features))
    for crop in range(TEST_CROPS):
        crop_seed = derived_seed(seed, crop)
        torch.manual_seed(crop_seed)  # the crops of the main process, and (through the loader's seed) of workers
        crops = ImageDataset.of_files(paths, train_transform(image_size))
        loader = image_loader(crops, batch_size, workers, seed=crop_seed)
        for x, rows in progress(loader, f"voc07 test crop {crop + 1}/{TEST_CROPS}", total=len(loader), unit="batch"):
            scores[rows.numpy()] += torch.sigmoid(head(model(network_input(x, device())))).cpu().double().numpy()
    return scores / TEST_CROPS


def class_average_precisions(scores: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """AP of each class over its non-difficult test images (None when it has no positive)."""
    ap = {}
    for c, name in enumerate(classes):
        known = targets[:, c] != 0
        value = average_precision(scores[known, c], targets[known, c] > 0)
        ap[name] = None if np.isnan(value) else value
    return ap


def voc07(
    *,
    voc: str,
    checkpoint: str,
    out: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    workers: int,
) -> None:
    """Stage 'eval-voc07': test AP per class and mAP of the FC6-8 and ALL settings -> ``out``."""
    trainval, test = read_voc(voc)
    classes = list(trainval.columns)
    log.info("VOC07 layout %s: %d classes, %d trainval and %d test images", voc, len(classes), len(trainval), len(test))
    result = {"classes": classes, "trainval_images": len(trainval), "test_images": len(test), "crops": TEST_CROPS}
    for setting in SETTINGS:
        model, head = fine_tune(
            checkpoint,
            setting,
            image_paths(voc, trainval),
            trainval.to_numpy(np.float32),
            image_size=image_size,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            workers=workers,
        )
        scores = crop_scores(model, head, image_paths(voc, test), image_size, batch_size, seed, workers)
        ap = class_average_precisions(scores, test.to_numpy(), classes)
        scored = [v for v in ap.values() if v is not None]
        result[setting] = {"mAP": float(np.mean(scored)) if scored else None, "ap": ap}
        log.info("VOC07 %s: mAP %s, AP per class %s", setting, result[setting]["mAP"], ap)
    write_json(out, {**result, "epochs": epochs, "lr": lr, "checkpoint_sha256": sha256(checkpoint)})
