"""k-nearest-neighbour classification on the penultimate feature: cosine similarity, majority vote."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from deepercluster.errors import ShardError
from deepercluster.evaluate.backbone import LabelledSet, labelled_images
from deepercluster.evaluate.common import bootstrap_interval
from deepercluster.formats.evals import write_json
from deepercluster.formats.features import open_shard, read_chunks
from deepercluster.formats.whitening import unit_rows

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


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    k: int,
    classes: int,
    chunk_rows: int = 1024,
    leave_one_out: bool = False,
) -> np.ndarray:
    """Class of each query row: majority vote of its ``k`` most cosine-similar train rows (ties: smallest class).

    With ``leave_one_out`` the queries are the train rows themselves, and none votes for itself.
    """
    train, k = unit_rows(np.asarray(train_x, np.float64)), min(k, len(train_x) - leave_one_out)
    predictions = []
    for start in range(0, len(query_x), chunk_rows):
        similarity = unit_rows(np.asarray(query_x[start : start + chunk_rows], np.float64)) @ train.T
        if leave_one_out:
            rows = np.arange(len(similarity))
            similarity[rows, start + rows] = -np.inf
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(similarity), classes))
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_y[nearest]), 1)
        predictions.append(votes.argmax(1))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def knn(*, manifest: str, features: str, out: str, k: int, label_column: str, seed: int) -> None:
    """Stage 'eval-knn': leave-one-out ``k``-NN (cosine) top-1 over every labelled image -> ``out``.

    Each image is classified by the vote of its k nearest other images; the 95% interval is
    bootstrapped over the images.
    """
    data = labelled_images(manifest, label_column)
    x, attrs = read_features(features, data)
    correct = knn_predict(x, data.targets, x, k, len(data.classes), leave_one_out=True) == data.targets
    top1, interval = float(correct.mean()), bootstrap_interval(correct, seed)
    log.info("%d-NN leave-one-out top-1 %.4f (95%% interval %s) on %d images of %d classes", k, top1,
             np.round(interval, 4).tolist(), len(correct), len(data.classes))  # fmt: skip
    write_json(
        out,
        {
            "k": k,
            "top1": top1,
            "ci95": interval,
            "label_column": label_column,
            "classes": len(data.classes),
            "images": len(correct),
            "feature": str(attrs.get("layer", "")),
            "checkpoint_sha256": str(attrs.get("checkpoint_sha256", "")),
        },
    )
