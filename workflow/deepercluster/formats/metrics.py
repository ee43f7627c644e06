"""``train/metrics.tsv`` (and ``train/running-metrics.tsv`` beside ``last.pt``): one row per training iteration,
the ``COLUMNS`` below; a head's loss and accuracy are empty where the method has no such head (DeepCluster no
super-class head, RotNet no sub-class head). And the rules' benchmark files (Snakemake's ``benchmark:``
TSV: ``s`` is the job's wall time in seconds)."""

from __future__ import annotations

import os

import pandas as pd

HEADS = ("super", "sub")  # the super-class head V and the sub-class heads W_s
COLUMNS = (
    *("round", "epoch", "iteration", "lr", "images_per_s", "loss"),
    *(f"{kind}_{head}" for head in HEADS for kind in ("loss", "acc")),
)


def read_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """A metrics table, every column of ``COLUMNS`` (NaN where a head is absent)."""
    return pd.read_csv(path, sep="\t")[list(COLUMNS)]


def benchmark_seconds(path: str | os.PathLike) -> float:
    """The wall time of the job a Snakemake benchmark file measured (its last run)."""
    return float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
