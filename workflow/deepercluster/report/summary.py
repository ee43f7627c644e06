"""``results/summary.tsv``: one row per round, what a user checks first after a run.

It reads only the files its rule declares as inputs, so Snakemake reruns it when any of
them changes: each round's ``train/metrics.tsv``, ``nmi.json`` and ``cluster_sizes.tsv``
(none for RotNet), and the rounds' benchmark files (each stage's wall time).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from deepercluster.files import atomic_output
from deepercluster.formats.labels import read_round_nmi, read_sizes
from deepercluster.formats.metrics import benchmark_seconds, read_metrics

log = logging.getLogger(__name__)


def stage_seconds(benchmarks: dict[str, dict[str, list[str]]]) -> dict[int, dict[str, float]]:
    """Per round, the wall time of each stage (``seconds_<stage>``), summed over its jobs' benchmark files
    (``benchmarks``: round -> stage -> files, ``plan.round_benchmarks``)."""
    return {
        int(r): {f"seconds_{stage}": sum(benchmark_seconds(path) for path in files) for stage, files in stages.items()}
        for r, stages in benchmarks.items()
    }


def clustering_columns(nmi: str, sizes: str) -> dict[str, float]:
    """NMI with every metadata column and the previous round; cluster sizes, empty clusters included."""
    scores = read_round_nmi(nmi)
    row = {f"nmi_{key}": np.nan if value is None else value for key, value in scores.items()}
    size = read_sizes(sizes)["size"]
    return row | {
        "clusters": len(size),
        "size_min": size.min(),
        "size_median": size.median(),
        "size_max": size.max(),
        "empty_clusters": int((size == 0).sum()),
    }


def training_columns(metrics: str) -> dict[str, float]:
    """The round of a block's metrics, and its last epoch's mean loss, accuracy and speed per head."""
    table = read_metrics(metrics)
    last_epoch = table[table["epoch"] == table["epoch"].max()]
    row = {"round": int(table["round"].iloc[0])}
    for column in ("loss", "loss_super", "acc_super", "loss_sub", "acc_sub", "images_per_s"):
        if last_epoch[column].notna().any():
            row[f"final_{column}"] = float(last_epoch[column].mean())
    return row


def summarize(
    *,
    metrics: list[str],
    out: str,
    nmi: list[str] | None = None,
    sizes: list[str] | None = None,
    benchmarks: dict[str, dict[str, list[str]]] | None = None,
    html: str | None = None,
) -> None:
    """Stage 'summary': one row per round -> ``out`` (TSV), and as a web page -> ``html`` (for the report).

    ``metrics[i]``, ``nmi[i]`` and ``sizes[i]`` are round i+1's files (``nmi`` and ``sizes`` absent
    for RotNet, which clusters nothing); ``benchmarks`` are every round's stage benchmark files, by round
    and stage.
    """
    nmi, sizes = nmi or [], sizes or []
    if len(nmi) != len(sizes) or (nmi and len(nmi) != len(metrics)):
        raise ValueError(f"{len(metrics)} metrics, {len(nmi)} nmi and {len(sizes)} sizes files: give one per round")
    seconds, rows = stage_seconds(benchmarks or {}), []
    for i, path in enumerate(metrics):
        training = training_columns(path)
        row = {"round": training.pop("round")}
        if nmi:
            row |= clustering_columns(nmi[i], sizes[i])
        rows.append(row | training | seconds.get(row["round"], {}))
    table = pd.DataFrame(rows)
    log.info("summary of %d rounds:\n%s", len(table), table.to_string(index=False))
    with atomic_output(out) as partial:
        table.to_csv(partial, sep="\t", index=False, float_format="%.4g")
    if html:
        with atomic_output(html) as partial:
            table.to_html(partial, index=False, float_format="%.4g", na_rep="", border=0)
