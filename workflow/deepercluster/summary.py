"""``results/summary.tsv``: one row per round, what a user checks first after a run.

It reads only the files its rule declares as inputs, so Snakemake reruns it when any of
them changes: each round's ``train/metrics.tsv``, ``nmi.json`` and ``cluster_sizes.tsv``
(none for RotNet), and the rounds' benchmark files (each stage's wall time).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from deepercluster.files import atomic_output

log = logging.getLogger(__name__)

# Stage name in the summary -> its benchmark files inside results/benchmarks/rounds/{r}/.
STAGE_BENCHMARKS = {
    "features": "features/shard-*.tsv",
    "pca": "pca.tsv",
    "super_clusters": "clusters/super.tsv",
    "sub_clusters": "clusters/sub-*.tsv",
    "labels": "labels.tsv",
    "train": "checkpoint.tsv",
}
ROUND_BENCHMARK = re.compile(r"(?:^|/)rounds/(\d+)/(.+)$")


def stage_seconds(benchmarks: list[str]) -> dict[int, dict[str, float]]:
    """Per round, the wall time of each stage (``seconds_<stage>``), summed over its jobs."""
    times: dict[int, dict[str, float]] = {}
    for path in benchmarks:
        match = ROUND_BENCHMARK.search(path)
        stage = match and next((s for s, p in STAGE_BENCHMARKS.items() if fnmatch.fnmatch(match[2], p)), None)
        if stage is None:
            raise ValueError(f"{path} is not the benchmark file of a round's stage ({', '.join(STAGE_BENCHMARKS)})")
        row = times.setdefault(int(match[1]), {})
        row[stage] = row.get(stage, 0.0) + pd.read_csv(path, sep="\t")["s"].iloc[-1]
    return {r: {f"seconds_{s}": row[s] for s in STAGE_BENCHMARKS if s in row} for r, row in times.items()}


def clustering_columns(nmi: str, sizes: str) -> dict[str, float]:
    """NMI with every metadata column and the previous round; cluster sizes, empty clusters included."""
    scores = json.loads(Path(nmi).read_text())
    row = {f"nmi_{key}": np.nan if value is None else value for key, value in scores.items()}
    size = pd.read_csv(sizes, sep="\t")["size"]
    return row | {
        "clusters": len(size),
        "size_min": size.min(),
        "size_median": size.median(),
        "size_max": size.max(),
        "empty_clusters": int((size == 0).sum()),
    }


def training_columns(metrics: str) -> dict[str, float]:
    """The round of a block's metrics, and its last epoch's mean loss, accuracy and speed per head."""
    table = pd.read_csv(metrics, sep="\t")
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
    benchmarks: list[str] | None = None,
    html: str | None = None,
) -> None:
    """Stage 'summary': one row per round -> ``out`` (TSV), and as a web page -> ``html`` (for the report).

    ``metrics[i]``, ``nmi[i]`` and ``sizes[i]`` are round i+1's files (``nmi`` and ``sizes`` absent
    for RotNet, which clusters nothing); ``benchmarks`` are every round's stage benchmark files.
    """
    nmi, sizes = nmi or [], sizes or []
    if len(nmi) != len(sizes) or (nmi and len(nmi) != len(metrics)):
        raise ValueError(f"{len(metrics)} metrics, {len(nmi)} nmi and {len(sizes)} sizes files: give one per round")
    seconds, rows = stage_seconds(benchmarks or []), []
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
