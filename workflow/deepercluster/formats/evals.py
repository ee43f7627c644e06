"""An evaluation's results, ``{run}/evals/{name}/{kind}.json`` (``linear``, ``knn``, ``nmi``, ``voc07``,
``retrieval``): one JSON object each, whose keys the evaluation's stage documents; ``compare`` reads them back.
And a run's ``{run}/evals/similarity.tsv``: ``round``, ``layer``, ``weight_cosine``, ``cka``, one row per round and
conv layer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from deepercluster.files import atomic_output


def write_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(value, indent=2) + "\n")


def read_evaluations(folder: str | os.PathLike) -> dict[str, dict]:
    """Every evaluation of one checkpoint's folder, by kind (the file's stem)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def write_similarity(path: str | os.PathLike, table: pd.DataFrame) -> None:
    with atomic_output(path) as partial:
        table[["round", "layer", "weight_cosine", "cka"]].to_csv(partial, sep="\t", index=False, float_format="%.6g")
