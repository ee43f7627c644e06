"""NMI between a checkpoint's k-means clusters and the metadata, and across rounds.

DeeperCluster Fig. 4 (NMI with each metadata column) and DeepCluster Fig. 2a-b (NMI with
the labels, and between consecutive rounds, over training). The evaluation images' features
(the 'features' stage) are PCA-whitened (the 'pca' stage) and L2-normalised, then clustered
by the workflow's k-means with ``seeds`` different seeds: every NMI is the mean and standard
deviation over those clusterings, so that a difference between checkpoints can be told from
the spread of k-means itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from deepercluster.cluster.kmeans import kmeans
from deepercluster.cluster.labels import nmi
from deepercluster.cluster.levels import whitened_shards
from deepercluster.evaluate.common import save_figure
from deepercluster.formats.evals import write_json
from deepercluster.formats.manifest import informative_columns, read_manifest, test_images
from deepercluster.seeds import derived_seed

log = logging.getLogger(__name__)


def seeded_clusterings(
    features: str, pca: str, k: int, seeds: int, iterations: int, seed: int, ids: np.ndarray | None = None
) -> list[pd.Series]:
    """``seeds`` k-means clusterings of the images ``ids`` (all by default) of one features file, each a cluster
    per image indexed by id."""
    source = whitened_shards([features], pca, cache_mb=float("inf"), keep_ids=ids, dtype="float32")
    results = [kmeans(source, k, iterations, derived_seed(seed, s)) for s in range(seeds)]
    return [pd.Series(result.assignments, index=result.ids) for result in results]


def mean_and_sd(scores: list[dict[str, float | None]]) -> tuple[dict, dict]:
    """Per key, the mean and the standard deviation over seeds (None where a key has no score)."""
    keys = scores[0].keys()
    values = {key: [s[key] for s in scores] for key in keys}
    mean = {key: None if None in v else float(np.mean(v)) for key, v in values.items()}
    sd = {key: None if None in v else float(np.std(v)) for key, v in values.items()}
    return mean, sd


def cluster_nmi(
    *,
    manifest: str,
    features: list[str],
    pcas: list[str],
    out: str,
    plot: str,
    k: int,
    seeds: int,
    iterations: int,
    seed: int,
    first_round: int | None = None,
) -> None:
    """Stage 'eval-nmi': NMI of k-means clusters of the test images with each of their metadata columns that is
    not constant (the NMI with a constant is 0 by definition) -> ``out``, ``plot``.

    ``features`` and ``pcas`` end with this checkpoint's files. When it is round r of a run, they
    hold the files of rounds ``first_round``..r and each round gets the same NMIs plus
    ``previous_round``, the NMI between its clustering and the round before's with the same seed;
    otherwise they hold one file each.
    """
    if len(features) != len(pcas) or (first_round is None and len(features) != 1):
        raise ValueError(f"{len(features)} features and {len(pcas)} pca files: give one pair, or one per round")
    images = test_images(read_manifest(manifest))
    columns = informative_columns(images)
    images = images.set_index("id")
    rounds, previous = [], None
    for features_file, pca in zip(features, pcas, strict=True):
        clusterings = seeded_clusterings(features_file, pca, k, seeds, iterations, seed, images.index.to_numpy())
        scores = [
            {column: nmi(assignment, images[column]) for column in columns}
            | {"previous_round": None if previous is None else nmi(assignment, previous[s])}
            for s, assignment in enumerate(clusterings)
        ]
        mean, sd = mean_and_sd(scores)
        rounds.append({"nmi": mean, "nmi_sd": sd})
        previous = clusterings
    log.info(
        "k-means k=%d on %d images, %d seeds: NMI %s, sd %s",
        k,
        len(previous[0]),
        seeds,
        rounds[-1]["nmi"],
        rounds[-1]["nmi_sd"],
    )
    over_rounds = None if first_round is None else [{"round": first_round + i, **row} for i, row in enumerate(rounds)]
    write_json(out, {"k": k, "images": len(previous[0]), "seeds": seeds, **rounds[-1], "rounds": over_rounds})
    save_figure(nmi_figure(over_rounds, rounds[-1], Path(out).parent.name), plot)


def nmi_figure(rounds: list[dict] | None, last: dict, title: str) -> Figure:
    """NMI (mean +- sd over k-means seeds) per metadata column and with the previous round, over rounds;
    bars for a single checkpoint."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    if rounds:
        numbers = [row["round"] for row in rounds]
        for column in last["nmi"]:
            mean = [np.nan if row["nmi"][column] is None else row["nmi"][column] for row in rounds]
            sd = [np.nan if row["nmi_sd"][column] is None else row["nmi_sd"][column] for row in rounds]
            axes.errorbar(numbers, mean, yerr=sd, fmt="o-", capsize=3, label=column)
        axes.set_xlabel("round")
        axes.set_xticks(numbers)
        axes.legend()
    else:
        scored = [column for column, value in last["nmi"].items() if value is not None]
        axes.bar(scored, [last["nmi"][c] for c in scored], yerr=[last["nmi_sd"][c] for c in scored], capsize=3)
        axes.set_xlabel("metadata column")
    axes.set_ylabel("NMI")
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return figure
