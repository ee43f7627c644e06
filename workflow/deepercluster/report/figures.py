"""The figures of a round for the run's report (``snakemake --report``), drawn from the round's own files.

One job per round (stage 'report-round') writes them all: the training curves of each head from
``train/metrics.tsv``; and, for the methods that cluster, the histogram of the cluster sizes
(``cluster_sizes.tsv``, empty clusters included), the NMI of the pseudo-labels over rounds 1..r
(each round's ``nmi.json``) and a grid of images of a few of its clusters (DeeperCluster Fig. 5).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

from deepercluster.evaluate.clusters import grid_figure
from deepercluster.evaluate.common import save_figure
from deepercluster.evaluate.nmi import nmi_figure
from deepercluster.formats.labels import read_labels, read_round_nmi, read_sizes
from deepercluster.formats.manifest import read_manifest
from deepercluster.formats.metrics import HEADS, read_metrics

log = logging.getLogger(__name__)


def training_figure(metrics: pd.DataFrame, title: str) -> Figure:
    """Loss and accuracy of each head per iteration (faint) with their running mean over about a tenth of the block."""
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    window = max(1, len(metrics) // 10)
    for head in HEADS:
        for axes, column, scale in ((loss_axes, f"loss_{head}", 1), (accuracy_axes, f"acc_{head}", 100)):
            if metrics[column].notna().any():
                values = scale * metrics[column]
                (line,) = axes.plot(metrics["iteration"], values, alpha=0.3)
                smooth = values.rolling(window, min_periods=1).mean()
                axes.plot(metrics["iteration"], smooth, color=line.get_color(), label=f"{head}-cluster head")
    for axes, name in ((loss_axes, "cross-entropy loss"), (accuracy_axes, "training accuracy (%)")):
        axes.set_xlabel("iteration")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    return figure


def sizes_figure(sizes: pd.Series, title: str) -> Figure:
    """Histogram of the cluster sizes on log axes; the empty clusters are the bar left of 1."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    edges = np.unique(np.r_[0, np.geomspace(1, sizes.max() + 1, 30).round()])
    empty = int((sizes == 0).sum())
    axes.hist(sizes[sizes > 0], bins=edges, color="tab:blue", label="clusters")
    axes.hist(sizes[sizes == 0], bins=[0, 1], color="tab:red", label=f"empty clusters ({empty})")
    axes.set_xscale("symlog", linthresh=1)
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("cluster size (images)")
    axes.set_ylabel("clusters")
    axes.set_title(f"{title}: {len(sizes)} clusters, median size {sizes.median():g}")
    axes.legend()
    return figure


def nmi_rounds(nmi: list[str]) -> list[dict]:
    """Rounds 1..r's ``nmi.json`` as the rows ``nmi_figure`` plots (no spread: one clustering per round)."""
    scores = [read_round_nmi(path) for path in nmi]
    return [{"round": r, "nmi": s, "nmi_sd": dict.fromkeys(s)} for r, s in enumerate(scores, start=1)]


def round_figures(
    *,
    round: int,
    metrics: str,
    training: str,
    manifest: str | None = None,
    labels: str | None = None,
    sizes: str | None = None,
    nmi: list[str] | None = None,
    sizes_plot: str | None = None,
    nmi_plot: str | None = None,
    grid: str | None = None,
    shown: int,
    seed: int,
) -> None:
    """Stage 'report-round': round ``round``'s figures -> ``training``, and where it clusters ``sizes_plot``,
    ``nmi_plot`` and ``grid``.

    ``nmi`` are the ``nmi.json`` of rounds 1..``round``; the clustering files and plots are all given
    (DeepCluster, DeeperCluster) or none (RotNet).
    """
    clustering = [manifest, labels, sizes, nmi, sizes_plot, nmi_plot, grid]
    if any(value is None for value in clustering) != all(value is None for value in clustering):
        raise ValueError("give every clustering file and plot (manifest to grid), or none of them for RotNet")
    if nmi is not None and len(nmi) != round:
        raise ValueError(f"{len(nmi)} nmi files for round {round}: give rounds 1..{round}'s")
    save_figure(training_figure(read_metrics(metrics), f"round {round}: training"), training)
    if labels is None:
        return
    save_figure(sizes_figure(read_sizes(sizes)["size"], f"round {round}"), sizes_plot)
    rounds = nmi_rounds(nmi)
    save_figure(nmi_figure(rounds, rounds[-1], f"round {round}: NMI of the pseudo-labels"), nmi_plot)
    assignment = read_labels(labels).flat()
    save_figure(grid_figure(read_manifest(manifest), assignment, shown, seed=seed), grid)
    log.info("round %d: figures %s", round, ", ".join([training, sizes_plot, nmi_plot, grid]))
