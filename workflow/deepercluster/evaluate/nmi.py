"""NMI between a checkpoint's k-means clusters and the metadata, and across rounds.

DeeperCluster Fig. 4 (NMI with each metadata column) and DeepCluster Fig. 2a-b (NMI with
the labels, and between consecutive rounds, over training). The clusters come from the
'super-clusters' stage run on the evaluation set's features (PCA-whitened, L2, k-means).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from deepercluster.cluster import open_clusters, read_assignments
from deepercluster.data import metadata_columns, read_manifest
from deepercluster.evaluate.common import save_figure, write_json
from deepercluster.labels import nmi

log = logging.getLogger(__name__)


def assignment_series(path: str) -> pd.Series:
    """Cluster of each image of a clusters file, indexed by id."""
    ids, assignments = read_assignments(path)
    return pd.Series(assignments, index=ids)


def cluster_nmi(*, manifest: str, clusters: list[str], out: str, plot: str, first_round: int | None = None) -> None:
    """Stage 'eval-nmi': NMI of k-means clusters with every metadata column of ``manifest`` -> ``out``, ``plot``.

    ``clusters`` ends with this checkpoint's clusters file. When it is round r of a run,
    ``clusters`` holds the files of rounds ``first_round``..r and each round gets the same
    NMIs plus ``previous_round``, its NMI with the round before; otherwise it holds one file.
    """
    if first_round is None and len(clusters) != 1:
        raise ValueError(f"{len(clusters)} clusters files given without first_round: give one, or their first round")
    images = read_manifest(manifest).set_index("id")
    columns = metadata_columns(images.reset_index())
    rounds, previous = [], None
    for path in clusters:
        assignment = assignment_series(path)
        row = {column: nmi(assignment, images[column]) for column in columns}
        row["previous_round"] = None if previous is None else nmi(assignment, previous)
        rounds.append(row)
        previous = assignment
    with open_clusters(clusters[-1]) as f:
        k = int(f.attrs["k"])
    log.info("k-means k=%d on %d images: NMI %s", k, len(previous), rounds[-1])
    over_rounds = None if first_round is None else [{"round": first_round + i, **row} for i, row in enumerate(rounds)]
    write_json(out, {"k": k, "images": len(previous), "nmi": rounds[-1], "rounds": over_rounds})
    save_figure(nmi_figure(over_rounds, rounds[-1], Path(out).parent.name), plot)


def nmi_figure(rounds: list[dict] | None, last: dict, title: str) -> Figure:
    """NMI per metadata column (and with the previous round) over rounds; bars for a single checkpoint."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    if rounds:
        numbers = [row["round"] for row in rounds]
        for column in last:
            values = [row[column] for row in rounds]
            axes.plot(numbers, [float("nan") if v is None else v for v in values], "o-", label=column)
        axes.set_xlabel("round")
        axes.set_xticks(numbers)
        axes.legend()
    else:
        scored = {column: value for column, value in last.items() if value is not None}
        axes.bar(list(scored), list(scored.values()))
        axes.set_xlabel("metadata column")
    axes.set_ylabel("NMI")
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return figure
