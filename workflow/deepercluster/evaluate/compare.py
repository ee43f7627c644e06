"""Checkpoints side by side (DeeperCluster Table 3, Figure 2): ``results/compare/table.md``, ``table.tsv`` and
``linear.png``.

Reads each checkpoint's evaluations in its folder: linear.json, knn.json and nmi.json, and voc07.json and
retrieval.json where they exist. The workflow's compare rule makes them, training each method's run first.

The headline probe is the first pooling of the linear probes (channels, then the papers' pooled features) on
which the supervised row's best layer beats the random init's best by more than both 95% intervals: the one
probe that can show learning at this budget at all. Each row's gain on it is given as the fraction of the
supervised row's gain over the random init that it closes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from deepercluster.errors import EvaluationError
from deepercluster.evaluate.common import accuracy_figure, save_figure
from deepercluster.files import atomic_output
from deepercluster.formats.evals import read_evaluations
from deepercluster.formats.features import POOLINGS

log = logging.getLogger(__name__)


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def with_interval(result: dict | None) -> str:
    """'top-1 [low, high]' in percent, the 95% interval of an evaluation that has one."""
    if result is None:
        return ""
    low, high = result["ci95"]
    return f"{percent(result['top1'])} [{percent(low)}, {percent(high)}]"


def read_evals(folder: Path) -> dict[str, dict]:
    """Every evaluation of one checkpoint's folder, by kind; linear.json at least."""
    if not (folder / "linear.json").exists():
        raise EvaluationError(f"{folder}/linear.json does not exist: make the evaluations of {folder.name} first")
    return read_evaluations(folder)


def scores(evals: dict[str, dict], kind: str) -> dict[tuple[str, str], dict]:
    """An evaluation's results by (pooling, layer): linear's or knn's."""
    return {(layer["pooling"], layer["layer"]): layer for layer in evals[kind]["layers"]} if kind in evals else {}


def best(evals: dict[str, dict], pooling: str) -> dict:
    """The linear probe of ``pooling`` of the best layer."""
    return max((s for (p, _), s in scores(evals, "linear").items() if p == pooling), key=lambda s: s["top1"])


def headline(rows: dict[str, dict[str, dict]]) -> str | None:
    """The pooling on which the supervised row's best layer is above the random init's by more than both 95%
    intervals (None without both rows, or when none is)."""
    if not {"random", "supervised"} <= set(rows):
        return None
    for pooling in POOLINGS:
        if best(rows["supervised"], pooling)["ci95"][0] > best(rows["random"], pooling)["ci95"][1]:
            return pooling
    return None


def gain_closed(rows: dict[str, dict[str, dict]], label: str, pooling: str) -> float:
    """The fraction of the supervised row's gain over the random init, best layer against best layer, that a row
    closes on ``pooling``."""
    floor, bound = (best(rows[name], pooling)["top1"] for name in ("random", "supervised"))
    return (best(rows[label], pooling)["top1"] - floor) / (bound - floor)


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def tables(rows: dict[str, dict[str, dict]], checkpoints: dict[str, str], label_column: str) -> list[str]:
    """table.md's lines: the linear probes, then k-NN, NMI and the transfer tasks, then the headline."""
    linear, knn = (
        list(dict.fromkeys(key for evals in rows.values() for key in scores(evals, kind))) for kind in ("linear", "knn")
    )
    knn.sort(key=lambda key: key[0] == "feature")  # the conv layers' channels, then the penultimate feature
    pick = headline(rows)
    first = markdown(
        ["method", "checkpoint", *(f"linear {layer} ({pooling})" for pooling, layer in linear)],
        [
            [label, f"`{checkpoints[label]}`", *(with_interval(scores(e, "linear").get(key)) for key in linear)]
            for label, e in rows.items()
        ],
    )
    second = []
    for label, evals in rows.items():
        nmi, sd = (evals["nmi"][key].get(label_column) for key in ("nmi", "nmi_sd"))
        voc07, retrieval = evals.get("voc07"), evals.get("retrieval")
        second.append(
            [
                label,
                *(with_interval(scores(evals, "knn").get(key)) for key in knn),
                "" if nmi is None else f"{nmi:.3f} ± {sd:.3f}",
                percent(voc07["fc6_8"]["mAP"]) if voc07 else "",
                percent(voc07["all"]["mAP"]) if voc07 else "",
                percent(retrieval["mAP"]) if retrieval else "",
                f"{100 * gain_closed(rows, label, pick):.0f}%" if pick else "",
            ]
        )
    k = next(iter(rows.values()))["knn"]["k"]
    second_header = [
        "method",
        *(f"{k}-NN {layer} ({pooling})" for pooling, layer in knn),
        f"NMI {label_column}",
        "VOC07 FC6-8 mAP",
        "VOC07 ALL mAP",
        "retrieval mAP",
        f"supervised gain closed ({pick})",
    ]
    said = (
        f"The headline probe is the linear probe on **{pick}** features: the supervised row's best layer beats "
        "the random init's by more than both 95% intervals there."
        if pick
        else "No probe shows the supervised row above the random init by more than the 95% intervals (or the table "
        "lacks one of them): at this budget the table cannot show learning."
    )
    return [
        *first,
        "",
        *markdown(second_header, second),
        "",
        said,
        "",
        f"Top-1 (%) [95% interval, bootstrapped over the test images] of each conv layer's converged linear probe "
        f"(trained on the train images) and of the test images' k-NN among the train images; NMI of k-means on the "
        f"test images' features with `{label_column}` (mean ± sd over k-means seeds); mAP (%) where configured.",
    ]


def tsv_row(label: str, checkpoint: str, evals: dict[str, dict], label_column: str) -> dict:
    """The numbers of one row, as fractions: each probe's top-1 and interval, NMI and its sd, mAPs."""
    row: dict = {"method": label, "checkpoint": checkpoint}
    for kind in ("linear", "knn"):
        for (pooling, layer), result in scores(evals, kind).items():
            column = f"{kind}_{pooling}_{layer}"
            row |= {column: result["top1"], f"{column}_low": result["ci95"][0], f"{column}_high": result["ci95"][1]}
    row |= {f"nmi_{label_column}": evals["nmi"]["nmi"].get(label_column)}
    row |= {f"nmi_{label_column}_sd": evals["nmi"]["nmi_sd"].get(label_column)}
    voc07, retrieval = evals.get("voc07"), evals.get("retrieval")
    row |= {"voc07_fc6_8": voc07 and voc07["fc6_8"]["mAP"], "voc07_all": voc07 and voc07["all"]["mAP"]}
    return row | {"retrieval": retrieval and retrieval["mAP"]}


def compare(
    *, labels: list[str], checkpoints: list[str], evals: list[str], out: str, tsv: str, plot: str, label_column: str
) -> None:
    """Stage 'compare': one row per checkpoint ``checkpoints[i]`` (shown as ``labels[i]``), evaluated in the
    folder ``evals[i]`` -> ``out`` (markdown), ``tsv`` (its numbers), ``plot`` (linear top-1 per layer)."""
    if not len(labels) == len(checkpoints) == len(evals):
        raise ValueError(f"{len(labels)} labels, {len(checkpoints)} checkpoints, {len(evals)} folders: give one each")
    rows = {label: read_evals(Path(folder)) for label, folder in zip(labels, evals, strict=True)}
    lines = tables(rows, dict(zip(labels, checkpoints, strict=True)), label_column)
    log.info("\n%s", "\n".join(lines))
    with atomic_output(out) as partial:
        partial.write_text("\n".join(lines) + "\n")
    named = zip(labels, checkpoints, strict=True)
    table = [tsv_row(label, checkpoint, rows[label], label_column) for label, checkpoint in named]
    pick = headline(rows)
    for row in table:
        row["headline"], row["supervised_gain_closed"] = pick, pick and gain_closed(rows, row["method"], pick)
    with atomic_output(tsv) as partial:
        pd.DataFrame(table).to_csv(partial, sep="\t", index=False)
    curves = {label: evals_["linear"]["layers"] for label, evals_ in rows.items()}
    save_figure(accuracy_figure(curves, 1 / next(iter(rows.values()))["linear"]["classes"]), plot)
