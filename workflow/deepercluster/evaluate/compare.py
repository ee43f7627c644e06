"""Checkpoints side by side (DeeperCluster Table 3, Figure 2): ``results/compare/table.md``, ``table.tsv``
and ``linear.png``.

Reads each checkpoint's evaluations in its folder: linear.json, knn.json and nmi.json, and
voc07.json and retrieval.json where they exist. The workflow's compare rule makes them, training
each method's run with the same data and budget first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from deepercluster.errors import EvaluationError
from deepercluster.evaluate.common import accuracy_figure, save_figure
from deepercluster.files import atomic_output
from deepercluster.formats.evals import read_evaluations

log = logging.getLogger(__name__)


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def with_interval(result: dict) -> str:
    """'top-1 [low, high]' in percent, the 95% interval of an evaluation that has one."""
    low, high = result["ci95"]
    return f"{percent(result['top1'])} [{percent(low)}, {percent(high)}]"


def read_evals(folder: Path) -> dict[str, dict]:
    """Every ``*.json`` evaluation of one checkpoint's folder, by file stem."""
    if not (folder / "linear.json").exists():
        raise EvaluationError(f"{folder}/linear.json does not exist: make the evaluations of {folder.name} first")
    return read_evaluations(folder)


def table_row(label: str, checkpoint: str, evals: dict[str, dict], layers: list[str], label_column: str) -> list[str]:
    """One row of table.md: top-1 (%) with its interval per column, NMI mean ± sd, mAPs where evaluated."""
    probes = {layer["layer"]: layer for layer in evals["linear"]["layers"]}
    row = [label, f"`{checkpoint}`", *(with_interval(probes[layer]) if layer in probes else "" for layer in layers)]
    nmi, sd = evals["nmi"]["nmi"].get(label_column), evals["nmi"]["nmi_sd"].get(label_column)
    row += [with_interval(evals["knn"]), "" if nmi is None else f"{nmi:.3f} ± {sd:.3f}"]
    voc07, retrieval = evals.get("voc07"), evals.get("retrieval")
    row += [percent(voc07["fc6_8"]["mAP"]), percent(voc07["all"]["mAP"])] if voc07 else ["", ""]
    return [*row, percent(retrieval["mAP"]) if retrieval else ""]


def tsv_row(label: str, checkpoint: str, evals: dict[str, dict], layers: list[str], label_column: str) -> dict:
    """The table's numbers of one row, as fractions: top-1 and its interval per column, NMI and its sd."""
    probes = {layer["layer"]: layer for layer in evals["linear"]["layers"]}
    scores = {f"linear_{layer}": probes.get(layer) for layer in layers} | {"knn": evals["knn"]}
    row: dict = {"method": label, "checkpoint": checkpoint}
    for column, result in scores.items():
        low, high = result["ci95"] if result else (None, None)
        row |= {column: result and result["top1"], f"{column}_low": low, f"{column}_high": high}
    row |= {f"nmi_{label_column}": evals["nmi"]["nmi"].get(label_column)}
    row |= {f"nmi_{label_column}_sd": evals["nmi"]["nmi_sd"].get(label_column)}
    voc07, retrieval = evals.get("voc07"), evals.get("retrieval")
    row |= {"voc07_fc6_8": voc07 and voc07["fc6_8"]["mAP"], "voc07_all": voc07 and voc07["all"]["mAP"]}
    return row | {"retrieval": retrieval and retrieval["mAP"]}


def compare(
    *,
    labels: list[str],
    checkpoints: list[str],
    evals: list[str],
    out: str,
    tsv: str,
    plot: str,
    label_column: str,
) -> None:
    """Stage 'compare': one row per checkpoint ``checkpoints[i]`` (shown as ``labels[i]``), evaluated in the
    folder ``evals[i]`` -> ``out`` (markdown), ``tsv`` (its numbers), ``plot`` (linear top-1 per layer)."""
    if not len(labels) == len(checkpoints) == len(evals):
        raise ValueError(f"{len(labels)} labels, {len(checkpoints)} checkpoints, {len(evals)} folders: give one each")
    found = [read_evals(Path(folder)) for folder in evals]
    layers = max(([layer["layer"] for layer in e["linear"]["layers"]] for e in found), key=len)
    header = ["method", "checkpoint", *(f"linear {layer}" for layer in layers), f"{found[0]['knn']['k']}-NN",
              f"NMI {label_column}", "VOC07 FC6-8 mAP", "VOC07 ALL mAP", "retrieval mAP"]  # fmt: skip
    rows = list(zip(labels, checkpoints, found, strict=True))
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(table_row(*row, layers, label_column)) + " |" for row in rows),
        "",
        f"Top-1 (%) [95% interval, bootstrapped over the images] of the converged linear probe of each conv layer "
        f"on the val split and of leave-one-out k-NN on every evaluation image; NMI of k-means on the features with "
        f"`{label_column}` (mean ± sd over k-means seeds); mAP (%) where configured, empty otherwise.",
    ]
    log.info("\n%s", "\n".join(lines))
    with atomic_output(out) as partial:
        partial.write_text("\n".join(lines) + "\n")
    with atomic_output(tsv) as partial:
        pd.DataFrame([tsv_row(*row, layers, label_column) for row in rows]).to_csv(partial, sep="\t", index=False)
    curves = {label: found_evals["linear"]["layers"] for label, _, found_evals in rows}
    save_figure(accuracy_figure(curves, 1 / found[0]["linear"]["classes"]), plot)
