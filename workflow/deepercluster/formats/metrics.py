"""``train/metrics.tsv`` (and ``train/running-metrics.tsv`` beside ``last.pt``): one row per training iteration,
the ``COLUMNS`` below; a head's loss and accuracy are empty where the method has no such head (DeepCluster no
super-class head, RotNet no sub-class head). And the rules' benchmark files (Snakemake's ``benchmark:``
TSV: ``s`` is the job's wall time in seconds)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pandas as pd

from deepercluster.files import atomic_output

HEADS = ("super", "sub")  # the super-class head V and the sub-class heads W_s
COLUMNS = (
    *("round", "epoch", "iteration", "lr", "images_per_s", "loss"),
    *(f"{kind}_{head}" for head in HEADS for kind in ("loss", "acc")),
)


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """A metrics table, every column of ``COLUMNS`` (NaN where a head is absent)."""
    return pd.read_csv(path, sep="\t")[list(COLUMNS)]


class MetricsWriter:
    """The running metrics file of a block, appended to row by row; on resume its rows from iteration
    ``resume_at`` on are dropped first (``kept``: those left). ``publish`` copies it, when the block ends, to the
    declared output."""

    def __init__(self, path: Path, resume_at: int) -> None:
        self.path = path
        rows = pd.read_csv(path, sep="\t") if path.exists() and resume_at else pd.DataFrame(columns=COLUMNS)
        self.kept = rows[rows["iteration"] < resume_at]  # the rows it resumes with
        self.kept.to_csv(path, sep="\t", index=False)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by publish())
        self.writer = csv.DictWriter(self.file, COLUMNS, delimiter="\t")

    def write(self, row: dict[str, float]) -> None:
        self.writer.writerow(row)

    def flush(self) -> None:
        self.file.flush()

    def publish(self, out: Path) -> None:
        self.file.close()
        with atomic_output(out) as partial:
            shutil.copyfile(self.path, partial)


def benchmark_seconds(path: str | os.PathLike) -> float:
    """The wall time of the job a Snakemake benchmark file measured (its last run)."""
    return float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
