"""Checkpoints side by side (DeeperCluster Table 3, Figure 2): ``results/compare/table.md`` and ``linear.png``.

Reads the evaluations already made under ``{evals}/{name}/``: linear.json, knn.json and
nmi.json of every checkpoint, and voc07.json and retrieval.json where they exist. Trains
nothing: the checkpoints come from runs made beforehand with the same budget.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from deepercluster.errors import EvaluationError
from deepercluster.evaluate.common import accuracy_figure, save_figure
from deepercluster.files import atomic_output

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
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def table_row(label: str, name: str, evals: dict[str, dict], layers: list[str], label_column: str) -> list[str]:
    probes = {layer["layer"]: layer for layer in evals["linear"]["layers"]}
    row = [label, f"`{name}`", *(with_interval(probes[layer]) if layer in probes else "" for layer in layers)]
    nmi, sd = evals["nmi"]["nmi"].get(label_column), evals["nmi"]["nmi_sd"].get(label_column)
    row += [with_interval(evals["knn"]), "" if nmi is None else f"{nmi:.3f} ± {sd:.3f}"]
    voc07, retrieval = evals.get("voc07"), evals.get("retrieval")
    row += [percent(voc07["fc6_8"]["mAP"]), percent(voc07["all"]["mAP"])] if voc07 else ["", ""]
    return [*row, percent(retrieval["mAP"]) if retrieval else ""]


def compare(
    *,
    labels: list[str],
    names: list[str],
    out: str,
    plot: str,
    evals: str = "results/evals",
    label_column: str = "label",
) -> None:
    """Stage 'compare': one row per checkpoint ``names[i]`` (shown as ``labels[i]``) -> ``out`` (markdown), ``plot``."""
    if len(labels) != len(names):
        raise ValueError(f"{len(labels)} labels for {len(names)} checkpoint names: give one label per name")
    found = {name: read_evals(Path(evals) / name) for name in names}
    layers = max(([layer["layer"] for layer in e["linear"]["layers"]] for e in found.values()), key=len)
    header = ["method", "checkpoint", *(f"linear {layer}" for layer in layers), f"{found[names[0]]['knn']['k']}-NN",
              f"NMI {label_column}", "VOC07 FC6-8 mAP", "VOC07 ALL mAP", "retrieval mAP"]  # fmt: skip
    rows = [
        table_row(label, name, found[name], layers, label_column) for label, name in zip(labels, names, strict=True)
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Top-1 (%) [95% interval, bootstrapped over the images] of the converged linear probe of each conv layer "
        f"on the val split and of leave-one-out k-NN on every evaluation image; NMI of k-means on the features with "
        f"`{label_column}` (mean ± sd over k-means seeds); mAP (%) where configured, empty otherwise.",
    ]
    log.info("\n%s", "\n".join(lines))
    with atomic_output(out) as partial:
        partial.write_text("\n".join(lines) + "\n")
    curves = {label: found[name]["linear"]["layers"] for label, name in zip(labels, names, strict=True)}
    save_figure(accuracy_figure(curves, 1 / found[names[0]]["linear"]["classes"]), plot)
