"""Feature extraction of one shard: the penultimate ("the feature") output of round r-1's model."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from deepercluster.checkpoints import load_model
from deepercluster.data import ImageDataset, feature_transform
from deepercluster.errors import ShardError
from deepercluster.files import sha256
from deepercluster.formats import read_manifest, write_shard
from deepercluster.logs import progress

log = logging.getLogger(__name__)

LAYER = "classifier output before ReLU (penultimate)"


@torch.no_grad()
def extract_features(
    *,
    manifest: str,
    checkpoint: str,
    shard: int,
    shard_size: int,
    image_size: int,
    out: str,
    batch_size: int = 256,
    workers: int = 0,
) -> None:
    """Stage 'features': rows ``[shard * shard_size, (shard + 1) * shard_size)`` of the manifest.

    Centre crop, no rotation, no flip; the model in eval mode (BatchNorm running statistics,
    no dropout). Writes ``features`` (n x d float32) and ``ids`` (n int64) with the
    checkpoint's sha256, the layer and the transform as attributes.
    """
    rows = read_manifest(manifest).iloc[shard * shard_size : (shard + 1) * shard_size]
    if rows.empty:
        raise ShardError(
            f"shard {shard} of {manifest} is empty: features.shard_size changed since the manifest; "
            "delete results/rounds/*/features and rerun"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(checkpoint)
    model.to(device).eval()
    transform = feature_transform(image_size)
    loader = DataLoader(
        ImageDataset(rows["path"].tolist(), rows["id"].tolist(), transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    features = np.zeros((len(rows), model.feature_dim), np.float32)
    ids = np.zeros(len(rows), np.int64)
    start = 0
    for images, batch_ids in progress(loader, f"features shard {shard}", total=len(loader), unit="batch"):
        stop = start + len(batch_ids)
        features[start:stop] = model(images.to(device, non_blocking=True)).float().cpu().numpy()
        ids[start:stop] = batch_ids.numpy()
        start = stop
    log.info("shard %d: %d images, %d-d features from %s", shard, len(ids), features.shape[1], checkpoint)
    write_shard(
        out,
        features,
        ids,
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha256(checkpoint),
        layer=LAYER,
        transform=repr(transform),
        manifest_sha256=sha256(manifest),
        shard=shard,
    )
