"""What a pool or a subset of it holds, from its manifest's columns: ``python -m deepercluster.data.composition
NAME=MANIFEST ...`` prints, for each manifest, its images, the images of no class (``label`` none), the near-duplicates
(``kind`` duplicate) and the copies beyond the first of each picture (``original`` repeated), and how balanced its
classes are (largest / smallest class, entropy of the class shares over log of the classes), then each class's share.

So a curated subset is compared with its pool and with a random subset of the same size by counting, not by eye
(docs/data.md, docs/science.md). Each column is read a row group at a time (``formats.manifest.value_counts``):
memory is the counts', whatever the pool's size. ``kind`` and ``original`` are the uncurated pool's
(``data.uncurated``); a manifest without them gets ``-`` there.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from deepercluster.data.pools import NO_CLASS
from deepercluster.errors import DataError
from deepercluster.evaluate.compare import markdown
from deepercluster.formats.manifest import manifest_file, value_counts


def with_share(n: int, total: int) -> str:
    """``n`` and its percentage of ``total``, as "n (x.x%)"."""
    return f"{n} ({100 * n / max(total, 1):.1f}%)"


def counts_if_present(manifest: str, column: str) -> pd.Series | None:
    """``value_counts`` of ``column``, or None where the manifest has no such column."""
    return value_counts(manifest, column) if column in manifest_file(manifest).schema_arrow.names else None


def summary(manifest: str, labels: pd.Series, class_counts: pd.Series) -> dict[str, object]:
    """One manifest's row of the composition table from its ``labels``' counts, its classes' shares measured over
    ``class_counts``' index."""
    kinds, originals = counts_if_present(manifest, "kind"), counts_if_present(manifest, "original")
    images = int(labels.sum())

    def share(n: int | None) -> str:
        return "-" if n is None else with_share(n, images)

    duplicates = None if kinds is None else int(kinds.get("duplicate", 0))
    copies = None if originals is None else int((originals.drop("-1", errors="ignore") - 1).sum())
    shares = class_counts / max(class_counts.sum(), 1)
    entropy = -(shares[shares > 0] * np.log(shares[shares > 0])).sum() / np.log(max(len(shares), 2))
    return {
        "images": images,
        "of no class": share(int(labels.get(NO_CLASS, 0))),
        "near-duplicates": share(duplicates),
        "copies beyond the first of a picture": share(copies),
        "classes present": f"{int((class_counts > 0).sum())} of {len(class_counts)}",
        "largest / smallest class": f"{class_counts.max()} / {class_counts.min()}",
        "class entropy / log classes": f"{entropy:.3f}",
    }


def composition(manifests: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary (a row per manifest) and each class's share of the labelled images (a column per manifest,
    the classes of all of them, largest first in the first); each manifest's label column read once."""
    labels = {name: value_counts(path, "label") for name, path in manifests.items()}
    counts = pd.DataFrame({name: found.drop(NO_CLASS, errors="ignore") for name, found in labels.items()})
    counts = counts.fillna(0).astype(np.int64).sort_values(next(iter(manifests)), ascending=False)
    rows = pd.DataFrame({name: summary(path, labels[name], counts[name]) for name, path in manifests.items()}).T
    shares = counts.apply(lambda column: column.map(lambda n: with_share(n, column.sum())))
    return rows, shares


def named_manifest(text: str) -> tuple[str, str]:
    """``NAME=MANIFEST`` -> (name, path)."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=MANIFEST")
    return name, path


def table(first: str, frame: pd.DataFrame) -> list[str]:
    """``frame`` as markdown lines, its index the ``first`` column."""
    return markdown([first, *frame.columns], [[str(i), *map(str, row)] for i, row in frame.iterrows()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deepercluster.data.composition", description=__doc__.split("\n")[0]
    )
    parser.add_argument("manifests", nargs="+", type=named_manifest, metavar="NAME=MANIFEST")
    args = parser.parse_args(argv)
    try:
        rows, shares = composition(dict(args.manifests))
    except DataError as error:
        parser.exit(1, f"error: {error}\n")
    print(*table("manifest", rows), "", *table("class", shares), sep="\n")


if __name__ == "__main__":
    main()
