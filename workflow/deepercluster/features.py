"""Feature extraction: the penultimate output ("the feature") of a checkpoint's model, for one shard of a round's
images (stage 'features') or for every evaluation image (stage 'eval-features')."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from deepercluster.checkpoints import load_model
from deepercluster.data.images import ImageDataset, feature_transform, network_input
from deepercluster.errors import ShardError
from deepercluster.files import sha256
from deepercluster.formats.features import write_shard
from deepercluster.formats.manifest import read_manifest
from deepercluster.logs import progress
from deepercluster.nn.models import ConvNet

log = logging.getLogger(__name__)

LAYER = "classifier output before ReLU (penultimate)"


def extract_features(
    *,
    manifest: str,
    checkpoint: str,
    shard: int,
    shard_size: int,
    image_size: int,
    out: str,
    batch_size: int,
    workers: int,
    dtype: str,
) -> None:
    """Stage 'features': rows ``[shard * shard_size, (shard + 1) * shard_size)`` of the manifest -> a shard (read
    alone: the job's memory does not grow with the manifest)."""
    rows = read_manifest(manifest, shard * shard_size, (shard + 1) * shard_size)
    if rows.empty:
        raise ShardError(
            f"shard {shard} of {manifest} is empty: features.shard_size changed since the manifest; "
            "delete results/rounds/*/features and rerun"
        )
    write_features(
        rows, manifest, checkpoint, image_size, out, batch_size, workers, f"features shard {shard}", dtype, shard=shard
    )


def extract_all(*, manifest: str, checkpoint: str, image_size: int, out: str, batch_size: int, workers: int) -> None:
    """Stage 'eval-features': every image of the (evaluation) manifest -> one features file."""
    write_features(
        read_manifest(manifest), manifest, checkpoint, image_size, out, batch_size, workers, "features", "float32"
    )


@torch.no_grad()
def features_of(
    model: ConvNet, loader: DataLoader, device: torch.device, dtype: str, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(features, ids) of ``loader``'s batches of (uint8 images, ids): ``model``'s output on each batch, made the
    network's input on ``device`` (``network_input``), held as ``dtype``."""
    features = np.zeros((len(loader.dataset), model.feature_dim), dtype)
    ids = np.zeros(len(loader.dataset), np.int64)
    start = 0
    for images, batch_ids in progress(loader, what, total=len(loader), unit="batch"):
        stop = start + len(batch_ids)
        features[start:stop] = model(network_input(images, device)).float().cpu().numpy()
        ids[start:stop] = batch_ids.numpy()
        start = stop
    return features, ids


def write_features(
    rows: pd.DataFrame,
    manifest: str,
    checkpoint: str,
    image_size: int,
    out: str,
    batch_size: int,
    workers: int,
    what: str,
    dtype: str,
    **attrs: object,
) -> None:
    """The features of the images ``rows`` of ``manifest`` -> ``out`` (``formats.features``), held and stored as
    ``dtype`` (float32, or float16: half the bytes).

    Centre crop, no rotation, no flip; the model in eval mode (BatchNorm running statistics, no dropout).
    The shard's attributes: the checkpoint and its sha256, the layer, the transform, the manifest's sha256.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(checkpoint)
    model.to(device).eval()
    transform = feature_transform(image_size)
    loader = DataLoader(
        ImageDataset(rows, transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    features, ids = features_of(model, loader, device, dtype, what)
    if not np.isfinite(features).all():
        raise ShardError(
            f"{what}: features of {checkpoint} are not finite as {dtype} (beyond float16's range?); "
            "set features.dtype: float32 in the config and rerun"
        )
    log.info("%s: %d images, %d-d features from %s", what, len(ids), features.shape[1], checkpoint)
    write_shard(
        out,
        features,
        ids,
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha256(checkpoint),
        layer=LAYER,
        transform=repr(transform),
        manifest_sha256=sha256(manifest),
        dtype=dtype,
        **attrs,
    )
