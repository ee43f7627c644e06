"""``results/summary.tsv``: one row per round, what a user checks first after a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from deepercluster.files import atomic_output

log = logging.getLogger(__name__)

# Stage name in the summary -> benchmark files of round r (Snakemake's `benchmark:` outputs).
STAGE_BENCHMARKS = {
    "features": "features/shard-*.tsv",
    "pca": "pca.tsv",
    "super_clusters": "clusters/super.tsv",
    "sub_clusters": "clusters/sub-*.tsv",
    "labels": "labels.tsv",
    "train": "checkpoint.tsv",
}


def stage_seconds(benchmarks: Path) -> dict[str, float]:
    """Wall time of each stage of a round, summed over its jobs (NaN when it did not run)."""
    times = {}
    for stage, pattern in STAGE_BENCHMARKS.items():
        files = sorted(benchmarks.glob(pattern))
        times[f"seconds_{stage}"] = sum(pd.read_csv(f, sep="\t")["s"].iloc[-1] for f in files) if files else np.nan
    return times


def round_row(results: Path, r: int) -> dict[str, float]:
    """NMI, cluster sizes, the last epoch's mean losses and accuracies, and stage times of round r."""
    row: dict[str, float] = {"round": r}
    round_dir = results / "rounds" / str(r)
    if (round_dir / "nmi.json").exists():
        nmi = json.loads((round_dir / "nmi.json").read_text())
        row |= {f"nmi_{key}": np.nan if value is None else value for key, value in nmi.items()}
        sizes = pd.read_csv(round_dir / "cluster_sizes.tsv", sep="\t")["size"]
        row |= {"clusters": len(sizes), "size_min": sizes.min(), "size_median": sizes.median(), "size_max": sizes.max()}
        row["empty_clusters"] = int((sizes == 0).sum())
    metrics = pd.read_csv(round_dir / "train" / "metrics.tsv", sep="\t")
    last_epoch = metrics[metrics["epoch"] == metrics["epoch"].max()]
    for column in ("loss", "loss_super", "acc_super", "loss_sub", "acc_sub", "images_per_s"):
        if last_epoch[column].notna().any():
            row[f"final_{column}"] = float(last_epoch[column].mean())
    return row | stage_seconds(results / "benchmarks" / "rounds" / str(r))


def summarize(*, rounds: int, out: str, results: str = "results") -> None:
    """Stage 'summary': write ``out`` with one row per round 1..``rounds``."""
    table = pd.DataFrame([round_row(Path(results), r) for r in range(1, rounds + 1)])
    log.info("summary of %d rounds:\n%s", rounds, table.to_string(index=False))
    with atomic_output(out) as partial:
        table.to_csv(partial, sep="\t", index=False, float_format="%.4g")
