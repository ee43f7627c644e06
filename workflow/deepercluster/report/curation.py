"""What a user looks at in a curated subset: its cluster sizes against the pool's, and images of a few
super-clusters from the pool and from the subset side by side."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from deepercluster.data.images import ImageDataset
from deepercluster.evaluate.clusters import mosaic, thumbnail
from deepercluster.evaluate.common import save_figure
from deepercluster.formats.labels import read_labels, read_sizes
from deepercluster.formats.manifest import read_manifest, read_manifest_ids

log = logging.getLogger(__name__)


def curated_sizes_figure(sizes: pd.DataFrame) -> Figure:
    """Each super-cluster's images in the pool and in the subset (left), and each sub-cluster's, largest in the
    pool first (right), on log axes."""
    figure = Figure(figsize=(11, 4))
    by_super, by_sub = figure.subplots(1, 2)
    supers = sizes.groupby("super_cluster")[["pool", "duplicates", "curated"]].sum()
    at = np.arange(len(supers))
    by_super.bar(at - 0.2, supers["pool"], 0.4, label="pool")
    by_super.bar(at + 0.2, supers["curated"], 0.4, label="subset")
    by_super.set_xticks(at, supers.index.astype(str))
    by_super.set_xlabel("super-cluster")
    subs = sizes.sort_values("pool", ascending=False, kind="stable")
    rank = np.arange(1, len(subs) + 1)
    by_sub.plot(rank, subs["pool"], label="pool")
    by_sub.plot(rank, subs["curated"], label="subset")
    by_sub.set_xlabel("sub-cluster, by its size in the pool")
    for axes in (by_super, by_sub):
        axes.set_yscale("log")
        axes.set_ylim(bottom=0.8)
        axes.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axes.set_ylabel("images")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(
        f"subset of {sizes['curated'].sum()} of the pool's {sizes['pool'].sum()} images "
        f"({sizes['duplicates'].sum()} duplicates dropped)"
    )
    return figure


def images_of(manifest: str, ids: np.ndarray, side: int) -> np.ndarray:
    """The images ``ids`` of ``manifest`` as one mosaic of thumbnails."""
    loaded = ImageDataset(read_manifest_ids(manifest, ids), functools.partial(thumbnail, side=side))
    return mosaic([loaded[i][0] for i in range(len(loaded))], side)


def side_by_side_figure(
    manifest: str, curated: str, labels: str, shown: int, seed: int, per_cluster: int = 9, side: int = 64
) -> Figure:
    """``per_cluster`` random images of ``shown`` random super-clusters of the subset: the pool's (left), the
    subset's (right)."""
    subset = read_manifest(curated)
    rng = np.random.default_rng(seed)
    supers = np.unique(subset["super_cluster"])
    chosen = np.sort(rng.choice(supers, size=min(shown, len(supers)), replace=False))
    figure = Figure(figsize=(6.4, 3.4 * len(chosen)))
    panels = figure.subplots(len(chosen), 2, squeeze=False)
    for (pool_panel, subset_panel), s in zip(panels, chosen, strict=True):
        pool_ids = read_labels(labels, super_cluster=s).table["id"].to_numpy()
        drawn = subset.loc[subset["super_cluster"] == s, "pool_id"].to_numpy()
        for panel, ids, name in ((pool_panel, pool_ids, "pool"), (subset_panel, drawn, "subset")):
            picked = np.sort(rng.choice(ids, size=min(per_cluster, len(ids)), replace=False))
            panel.imshow(images_of(manifest, picked, side))
            panel.set_title(f"super-cluster {s}: {name} ({len(ids)} images)", fontsize=9)
            panel.axis("off")
    return figure


def curation_figures(
    *, manifest: str, curated: str, labels: str, sizes: str, sizes_plot: str, grid: str, shown: int, seed: int
) -> None:
    """Stage 'curation-figures': the subset ``curated``'s cluster sizes against the pool's (``sizes`` ->
    ``sizes_plot``), and images of ``shown`` of its super-clusters from the pool ``manifest`` and from the subset
    side by side (``grid``)."""
    save_figure(curated_sizes_figure(read_sizes(sizes)), sizes_plot)
    save_figure(side_by_side_figure(manifest, curated, labels, shown, seed), grid)
    log.info("curated subset %s: figures %s, %s", curated, sizes_plot, grid)
