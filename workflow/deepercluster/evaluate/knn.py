"""k-nearest-neighbour classification on the penultimate feature: cosine similarity, majority vote."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from deepercluster.errors import ShardError
from deepercluster.evaluate.backbone import LabelledSet, labelled_split
from deepercluster.evaluate.common import write_json
from deepercluster.shards import open_shard, read_chunks

log = logging.getLogger(__name__)


def read_features(path: str, data: LabelledSet) -> tuple[np.ndarray, dict]:
    """The rows of a features file (the 'features' stage's output) for ``data``'s images, and its attributes."""
    with open_shard(path) as f:
        attrs = dict(f.attrs)
    chunks = list(read_chunks([path]))
    ids, x = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    position = pd.Index(ids).get_indexer(data.ids)
    if (position < 0).any():
        raise ShardError(
            f"{path} lacks {int((position < 0).sum())} images of the evaluation manifest: delete it and rerun"
        )
    return x[position], attrs


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(
    train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int, classes: int, chunk_rows: int = 1024
) -> np.ndarray:
    """Class of each query row: majority vote of its ``k`` most cosine-similar train rows (ties: smallest class)."""
    train, k = unit_rows(train_x), min(k, len(train_x))
    predictions = []
    for start in range(0, len(query_x), chunk_rows):
        similarity = unit_rows(query_x[start : start + chunk_rows]) @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(similarity), classes))
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_y[nearest]), 1)
        predictions.append(votes.argmax(1))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def knn(
    *,
    manifest: str,
    features: str,
    out: str,
    k: int = 20,
    label_column: str = "label",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> None:
    """Stage 'eval-knn': top-1 on the val split of a ``k``-NN (cosine) vote over the train split -> ``out``."""
    data = labelled_split(manifest, label_column, val_fraction, seed)
    x, attrs = read_features(features, data)
    predictions = knn_predict(x[~data.val], data.targets[~data.val], x[data.val], k, len(data.classes))
    top1 = float(np.mean(predictions == data.targets[data.val]))
    log.info("%d-NN top-1 %.4f on %d val images (%d train, %d classes)", k, top1, data.val.sum(), (~data.val).sum(),
             len(data.classes))  # fmt: skip
    write_json(
        out,
        {
            "k": k,
            "top1": top1,
            "label_column": label_column,
            "classes": len(data.classes),
            "train_images": int((~data.val).sum()),
            "val_images": int(data.val.sum()),
            "feature": str(attrs.get("layer", "")),
            "checkpoint_sha256": str(attrs.get("checkpoint_sha256", "")),
        },
    )
