"""A look at the clusters (DeeperCluster Fig. 5): 9 random images of a few random clusters, each
captioned with its size and the dominant value of every metadata column (with its share)."""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from deepercluster.data.images import ImageDataset
from deepercluster.evaluate.common import save_figure
from deepercluster.formats.clusters import read_clusters
from deepercluster.formats.manifest import informative_columns, read_manifest

log = logging.getLogger(__name__)

PANELS_PER_ROW = 3


def thumbnail(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(ImageOps.fit(image, (side, side)))


def mosaic(images: list[np.ndarray], side: int) -> np.ndarray:
    """Up to 9 square RGB thumbnails in a 3 x 3 grid on white."""
    grid = np.full((3 * side, 3 * side, 3), 255, np.uint8)
    for i, image in enumerate(images[:9]):
        row, column = divmod(i, 3)
        grid[row * side : (row + 1) * side, column * side : (column + 1) * side] = image
    return grid


def dominant_values(members: pd.DataFrame, columns: list[str]) -> list[str]:
    """'column: value (share)' of each metadata column's most frequent value among ``members``."""
    captions = []
    for column in columns:
        counts = members[column].astype(str).value_counts()
        if len(counts):
            captions.append(f"{column}: {counts.index[0]} ({counts.iloc[0] / len(members):.0%})")
    return captions


def cluster_grid(
    *, manifest: str, clusters: str, out: str, shown: int, seed: int, per_cluster: int = 9, side: int = 64
) -> None:
    """Stage 'eval-clusters': ``per_cluster`` random images of ``shown`` random clusters of ``clusters`` -> ``out``."""
    found = read_clusters(clusters)
    assignment = pd.Series(found.assignments, index=found.ids)
    save_figure(grid_figure(read_manifest(manifest), assignment, shown, per_cluster, seed, side), out)


def grid_figure(
    manifest: pd.DataFrame, assignment: pd.Series, shown: int = 6, per_cluster: int = 9, seed: int = 0, side: int = 64
) -> Figure:
    """``per_cluster`` random images of ``shown`` random non-empty clusters of ``assignment`` (a cluster per
    image, indexed by id), each captioned with its size and its dominant metadata values."""
    images = manifest.set_index("id")
    columns = informative_columns(manifest)
    rng = np.random.default_rng(seed)
    sizes = assignment.value_counts()
    chosen = np.sort(rng.choice(sizes.index.to_numpy(), size=min(shown, len(sizes)), replace=False))
    rows = math.ceil(len(chosen) / PANELS_PER_ROW)
    figure = Figure(figsize=(3.2 * min(len(chosen), PANELS_PER_ROW), 3.8 * rows))
    axes = figure.subplots(rows, min(len(chosen), PANELS_PER_ROW), squeeze=False).ravel()
    for panel, cluster in zip(axes, chosen, strict=False):
        members = assignment.index[assignment == cluster].to_numpy()
        picked = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        loaded = ImageDataset(images.loc[picked].reset_index(), functools.partial(thumbnail, side=side))
        panel.imshow(mosaic([loaded[i][0] for i in range(len(loaded))], side))
        caption = [f"cluster {cluster} ({len(members)} images)", *dominant_values(images.loc[members], columns)]
        panel.set_title("\n".join(caption), fontsize=9)
        log.info("%s", "; ".join(caption))
    for panel in axes:
        panel.axis("off")
    return figure
