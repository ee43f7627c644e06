"""What the evaluations share that needs no network: average precision, bootstrap intervals, the linear-probe
figure, and PNG outputs written atomically (a killed stage leaves no finished-looking file)."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from deepercluster.files import atomic_output
from deepercluster.formats.features import row_blocks


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Non-interpolated AP: sum over score thresholds of (recall step) x precision, tied scores one threshold.

    NaN when nothing is relevant.
    """
    relevant = np.asarray(relevant, bool)
    if not relevant.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ranked = np.asarray(scores, np.float64)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    hits = np.cumsum(relevant[order])[last_of_tie]
    precision, recall = hits / (last_of_tie + 1), hits / hits[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def bootstrap_interval(correct: np.ndarray, seed: int, resamples: int = 1000) -> list[float]:
    """95% interval of the mean of ``correct`` (one 0/1 per image), bootstrapped over the images."""
    correct = np.asarray(correct, np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(resamples)])
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def standardise(x: np.ndarray, train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Float32 copies of the rows ``train``, ``*others`` (index arrays) of ``x``, with the train rows' per-dimension
    mean removed and unit variance (constant dims: 0).

    The statistics are summed in float64 a block of rows at a time and each copy is scaled in place: no temporary
    the size of ``x`` (on a VM a fresh page can cost more than the arithmetic done on it).
    """
    blocks = row_blocks(train, x.shape[1], 8)
    mean = sum(x[rows].sum(0, dtype=np.float64) for rows in blocks) / len(train)
    std = np.sqrt(sum(np.square(x[rows] - mean).sum(0) for rows in blocks) / len(train))
    scale = np.where(std > 1e-6, 1 / np.maximum(std, 1e-6), 0.0)
    copies = [x[rows].astype(np.float32, copy=False) for rows in (train, *others)]
    for copy in copies:
        copy -= mean.astype(np.float32)
        copy *= scale.astype(np.float32)
    return copies


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    with atomic_output(path) as partial:
        figure.savefig(partial, format="png", dpi=100, bbox_inches="tight")


def accuracy_figure(curves: dict[str, list[dict]], chance: float | None = None) -> Figure:
    """Top-1 (%) per conv layer with its 95% interval, one line per checkpoint and a panel per pooling of the
    probes' features, as the paper's Figure 2."""
    poolings = list(dict.fromkeys(layer.get("pooling", "pooled") for layers in curves.values() for layer in layers))
    figure = Figure(figsize=(5 * len(poolings), 4))
    for axes, pooling in zip(np.atleast_1d(figure.subplots(1, len(poolings))), poolings, strict=True):
        for label, layers in curves.items():
            own = [layer for layer in layers if layer.get("pooling", "pooled") == pooling]
            top1 = np.array([100 * layer["top1"] for layer in own])
            interval = np.array([[100 * bound for bound in layer["ci95"]] for layer in own]).T
            axes.errorbar(
                [layer["layer"] for layer in own], top1, yerr=np.abs(interval - top1), fmt="o-", capsize=3, label=label
            )
        if chance is not None:
            axes.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
        axes.set_title(f"{pooling} features")
        axes.set_xlabel("conv layer")
        axes.set_ylabel("linear probe top-1 (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    return figure
