"""Methods compared on the same test images over repeated runs (docs/science.md): each row's linear top-1 as the
mean and range over its repeats, and its difference from a reference row with a 95% interval from a paired
bootstrap.

A row is one method's ``linear.json`` from each of its repeats (the same config run with another ``seed``). Every
bootstrap resample draws the test images once, for all rows alike, so the difference is paired: an image that is
hard for one probe is mostly hard for the other, and the difference's interval is narrower than either row's own.
Each row's repeats are drawn with replacement too, so the interval holds the rerun spread as well as the test
set's. A difference whose interval excludes 0 is resolved; one whose interval holds 0 is reported as none.

Given the pool the methods trained on (``--pool``) and the evaluation manifest the probes scored, the table is also
given on the test images of the pool's head classes and of its tail classes apart (``class_groups``): how a method
trained on a long-tailed pool does on the classes it saw least.

A gain change (``--gain-change NAME=A-B,C-D``) asks whether a gain itself moved: row A's gain over row B minus row C's
over row D, e.g. DeeperCluster's gain over the RotNet continuation at 40,000 images against at 2,500, or a method's
curated-minus-uncurated gap against another's, with its interval from one paired bootstrap of the four rows.

    python -m deepercluster.evaluate.paired --against rotnet \\
        --row rotnet=seed-0/results/rotnet/evals/round-10,seed-1/results/rotnet/evals/round-10 \\
        --row deepercluster=seed-0/results/evals/round-10,seed-1/results/evals/round-10 --out paired.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from deepercluster.errors import EvaluationError, InputError, one_line
from deepercluster.evaluate.backbone import labelled_roles
from deepercluster.formats.evals import ids_fingerprint, unpack_correct
from deepercluster.formats.manifest import value_counts

RESAMPLES = 2000
ALL = "all"


def read_repeats(folders: list[str]) -> list[dict]:
    """Each repeat's linear.json, refused unless it keeps which test images each probe got right."""
    evaluations = []
    for folder in folders:
        path = Path(folder) / "linear.json"
        if not path.exists():
            raise EvaluationError(f"{path} does not exist: evaluate that checkpoint first (snakemake {path})")
        evaluation = json.loads(path.read_text())
        if "test_ids_sha256" not in evaluation:
            raise EvaluationError(
                f"{path} keeps no test image's result (written before linear.json had test_correct): delete it and "
                f"rerun snakemake {path}"
            )
        evaluations.append(evaluation)
    return evaluations


def correct_matrix(evaluations: list[dict], layer: str, pooling: str) -> np.ndarray:
    """[repeats, test images] bool: which test images the probe of ``layer`` and ``pooling`` got right."""
    return np.stack(
        [
            unpack_correct(probe["test_correct"], evaluation["test_images"])
            for evaluation in evaluations
            for probe in evaluation["layers"]
            if (probe["layer"], probe["pooling"]) == (layer, pooling)
        ]
    )


def paired_difference(
    a: np.ndarray, b: np.ndarray, seed: int, resamples: int = RESAMPLES
) -> tuple[float, float, float]:
    """Mean top-1 of ``a`` minus that of ``b`` ([repeats, images] each, the same images) and its 95% interval."""
    return contrast([(1, a), (-1, b)], seed, resamples)


def contrast(terms: list[tuple[int, np.ndarray]], seed: int, resamples: int = RESAMPLES) -> tuple[float, float, float]:
    """The sum of weight x mean top-1 over ``terms`` ((weight, [repeats, images]), the same images in all) and its
    95% interval, resampling the images (one draw for every term) and each term's repeats."""
    rng = np.random.default_rng(seed)
    images = terms[0][1].shape[1]
    values = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, images, images)
        means = [weight * rows[rng.integers(0, len(rows), len(rows))].mean(0) for weight, rows in terms]
        values[i] = np.sum(means, axis=0)[drawn].mean()
    low, high = np.quantile(values, [0.025, 0.975])
    return float(sum(weight * rows.mean() for weight, rows in terms)), float(low), float(high)


def class_groups(pool: str, eval_manifest: str, label_column: str) -> tuple[str, dict[str, np.ndarray]]:
    """(the test images' fingerprint, masks over them): all of them, those of the head classes (the half of the
    classes holding the most of the pool's labelled images) and those of the tail classes (the other half)."""
    counts = value_counts(pool, label_column)
    data = labelled_roles(eval_manifest, label_column)
    ranked = sorted(data.classes, key=lambda c: (-counts.get(c, 0), c))
    head = [data.classes.index(c) for c in ranked[: len(ranked) // 2]]
    targets = data.targets[~data.train]
    in_head = np.isin(targets, head)
    return ids_fingerprint(data.ids[~data.train]), {ALL: np.ones(len(targets), bool), "head": in_head, "tail": ~in_head}


def checked_evaluations(rows: dict[str, list[str]], against: str, fingerprint: str | None) -> dict[str, list[dict]]:
    """Each row's repeats' linear.json, refused unless ``against`` is a row and every probe scored the same test
    images (those of ``fingerprint``, where given)."""
    evaluations = {name: read_repeats(folders) for name, folders in rows.items()}
    if against not in evaluations:
        raise EvaluationError(f"--against {against} is none of the rows ({', '.join(rows)}): name one of them")
    fingerprints = {e["test_ids_sha256"] for repeats in evaluations.values() for e in repeats}
    if len(fingerprints | ({fingerprint} if fingerprint else set())) > 1:
        raise EvaluationError(
            "the rows' probes (or --eval-manifest) scored different test images (test_ids_sha256 differs): evaluate "
            "every run on the same evaluation.data, and give its results/data/eval/manifest.parquet"
        )
    return evaluations


def paired_table(
    rows: dict[str, list[str]], against: str, seed: int = 0, groups: tuple[str, dict[str, np.ndarray]] | None = None
) -> pd.DataFrame:
    """One line per conv layer, pooling, group of test images (``class_groups``; all of them by default) and row:
    its repeats' top-1 (mean, min, max) and its paired difference from row ``against`` with the interval."""
    lines = []
    for probe, correct in probes(checked_evaluations(rows, against, groups and groups[0]), groups):
        for name, repeats in correct.items():
            top1 = repeats.mean(1)
            difference, low, high = paired_difference(repeats, correct[against], seed)
            lines.append(
                {
                    **probe,
                    **{"row": name, "repeats": len(repeats), "top1": top1.mean(), "top1_min": top1.min()},
                    **{"top1_max": top1.max(), "difference": difference, "low": low, "high": high},
                    "resolved": name != against and (low > 0 or high < 0),
                }
            )
    return pd.DataFrame(lines)


def gain_changes(
    rows: dict[str, list[str]],
    changes: dict[str, tuple[str, str, str, str]],
    seed: int = 0,
    groups: tuple[str, dict[str, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """One line per conv layer, pooling, group of test images and change ``name: (a, b, c, d)``: how row a's gain
    over row b differs from row c's over row d, (a - b) - (c - d), with its 95% interval from one paired bootstrap of
    the four (e.g. DeeperCluster's gain over the RotNet continuation at 40,000 images against at 2,500)."""
    for name, terms in changes.items():
        if missing := [row for row in terms if row not in rows]:
            raise EvaluationError(f"--gain-change {name} names {', '.join(missing)}, not a row: give each with --row")
    lines = []
    for probe, correct in probes(checked_evaluations(rows, next(iter(rows)), groups and groups[0]), groups):
        for name, (a, b, c, d) in changes.items():
            terms = [(1, correct[a]), (-1, correct[b]), (-1, correct[c]), (1, correct[d])]
            change, low, high = contrast(terms, seed)
            resolved = low > 0 or high < 0
            lines.append(
                {**probe, "change": name, "difference": change, "low": low, "high": high, "resolved": resolved}
            )
    return pd.DataFrame(lines)


def probes(
    evaluations: dict[str, list[dict]], groups: tuple[str, dict[str, np.ndarray]] | None
) -> Iterator[tuple[dict[str, str], dict[str, np.ndarray]]]:
    """For each conv layer, pooling and group of test images (all of them without ``groups``): the probe's names
    and each row's [repeats, images of the group] of test images its probes got right."""
    for probe in next(iter(evaluations.values()))[0]["layers"]:
        layer, pooling = probe["layer"], probe["pooling"]
        correct = {name: correct_matrix(repeats, layer, pooling) for name, repeats in evaluations.items()}
        images = next(iter(correct.values())).shape[1]
        for group, mask in (groups[1] if groups else {ALL: np.ones(images, bool)}).items():
            names = {"layer": layer, "pooling": pooling, "images": group}
            yield names, {name: repeats[:, mask] for name, repeats in correct.items()}


def markdown(table: pd.DataFrame, against: str) -> str:
    """The table in points (%): each row's mean [min, max] over repeats, its difference from ``against``."""
    lines = [
        f"| layer | test images | row | repeats | top-1, mean [min, max] | minus {against} [95% paired] | resolved |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in table.itertuples():
        verdict = "-" if line.row == against else ("yes" if line.resolved else "no: none")
        lines.append(
            f"| {line.layer} ({line.pooling}) | {line.images} | {line.row} | {line.repeats} | {100 * line.top1:.1f} "
            f"[{100 * line.top1_min:.1f}, {100 * line.top1_max:.1f}] | {100 * line.difference:+.1f} "
            f"[{100 * line.low:+.1f}, {100 * line.high:+.1f}] | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def changes_markdown(table: pd.DataFrame, changes: dict[str, tuple[str, str, str, str]]) -> str:
    """The gain changes in points (%), each with its interval."""
    lines = ["| layer | test images | change | (a - b) - (c - d) [95% paired] | resolved |", "|---|---|---|---|---|"]
    for line in table.itertuples():
        a, b, c, d = changes[line.change]
        lines.append(
            f"| {line.layer} ({line.pooling}) | {line.images} | {line.change}: ({a} - {b}) - ({c} - {d}) | "
            f"{100 * line.difference:+.1f} [{100 * line.low:+.1f}, {100 * line.high:+.1f}] | "
            f"{'yes' if line.resolved else 'no: none'} |"
        )
    return "\n".join(lines) + "\n"


def gain_change(text: str) -> tuple[str, tuple[str, str, str, str]]:
    """``NAME=A-B,C-D`` as (NAME, (A, B, C, D))."""
    name, _, terms = text.partition("=")
    pairs = [pair.split("-") for pair in terms.split(",")]
    if not name or len(pairs) != 2 or any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=A-B,C-D (four row names)")
    return name, (*pairs[0], *pairs[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deepercluster.evaluate.paired", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--row", action="append", required=True, help="NAME=EVAL_FOLDER[,EVAL_FOLDER...]: a repeat each"
    )
    parser.add_argument("--against", required=True, help="the row every difference is taken from")
    parser.add_argument("--pool", help="the manifest the methods trained on: also the head and tail classes apart")
    parser.add_argument("--eval-manifest", default="results/data/eval/manifest.parquet", help="with --pool")
    parser.add_argument("--label-column", default="label", help="with --pool")
    parser.add_argument(
        "--gain-change",
        action="append",
        type=gain_change,
        default=[],
        help="NAME=A-B,C-D: row A's gain over row B minus row C's over row D, e.g. a method's gain at two sizes",
    )
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    rows = {name: folders.split(",") for name, folders in (row.split("=", 1) for row in args.row)}
    try:
        groups = class_groups(args.pool, args.eval_manifest, args.label_column) if args.pool else None
        text = markdown(paired_table(rows, args.against, args.seed, groups), args.against)
        if changes := dict(args.gain_change):
            text += "\n" + changes_markdown(gain_changes(rows, changes, args.seed, groups), changes)
    except InputError as error:
        raise SystemExit(one_line(error)) from None
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
