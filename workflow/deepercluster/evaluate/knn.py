"""k-nearest-neighbour classification, the standard way: each test image is classified by the majority vote of
its k most cosine-similar train images, on the penultimate feature and on each conv layer's channels."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from deepercluster.errors import ShardError
from deepercluster.evaluate.backbone import LabelledSet, labelled_roles
from deepercluster.evaluate.common import bootstrap_interval, standardise
from deepercluster.formats.evals import write_json
from deepercluster.formats.features import open_shard, probe_attributes, read_chunks, read_probe_layer
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
    train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int, classes: int, chunk_rows: int = 1024
) -> np.ndarray:
    """Class of each query row: majority vote of its ``k`` most cosine-similar train rows (ties: smallest class)."""
    train, k = unit_rows(np.asarray(train_x, np.float64)), min(k, len(train_x))
    predictions = []
    for start in range(0, len(query_x), chunk_rows):
        similarity = unit_rows(np.asarray(query_x[start : start + chunk_rows], np.float64)) @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(similarity), classes))
        np.add.at(votes, (np.arange(len(similarity))[:, None], train_y[nearest]), 1)
        predictions.append(votes.argmax(1))
    return np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def knn_layer(x: np.ndarray, data: LabelledSet, k: int, seed: int) -> dict[str, object]:
    """Top-1 and 95% interval of the test images' k-NN vote among the train images, on features ``x`` standardised
    by the train images' mean and spread (as the linear probes' are)."""
    train, test = standardise(x, np.flatnonzero(data.train), np.flatnonzero(~data.train))
    correct = knn_predict(train, data.targets[data.train], test, k, len(data.classes))
    correct = correct == data.targets[~data.train]
    return {"top1": float(correct.mean()), "ci95": bootstrap_interval(correct, seed)}


def knn(*, manifest: str, features: str, probe_features: str, out: str, k: int, label_column: str, seed: int) -> None:
    """Stage 'eval-knn': ``k``-NN (cosine) top-1 of the test images, the train images their neighbours -> ``out``.

    On the penultimate feature (the one the clustering sees) and on each conv layer's channels (globally
    average-pooled: what the backbone itself learned). The 95% intervals are bootstrapped over the test images.
    """
    data = labelled_roles(manifest, label_column)
    x, attrs = read_features(features, data)
    layers = [{"layer": "penultimate", "pooling": "feature", **knn_layer(x, data, k, seed)}]
    for name in probe_attributes(probe_features)["layers"]:
        channels = read_probe_layer(probe_features, f"channels/{name}", data.ids)
        layers.append({"layer": name, "pooling": "channels", **knn_layer(channels, data, k, seed)})
    for layer in layers:
        log.info(
            "%d-NN on %s (%s): test top-1 %.4f (95%% interval %s)",
            k,
            layer["layer"],
            layer["pooling"],
            layer["top1"],
            np.round(layer["ci95"], 4).tolist(),
        )
    write_json(
        out,
        {
            "k": k,
            "label_column": label_column,
            "classes": len(data.classes),
            "train_images": int(data.train.sum()),
            "test_images": int((~data.train).sum()),
            "checkpoint_sha256": str(attrs.get("checkpoint_sha256", "")),
            "layers": layers,
        },
    )
