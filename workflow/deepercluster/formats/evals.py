"""An evaluation's results, ``{run}/evals/{name}/{kind}.json`` (``linear``, ``knn``, ``nmi``, ``voc07``,
``retrieval``): one JSON object each, whose keys the evaluation's stage documents; ``compare`` reads them back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deepercluster.files import atomic_output


def write_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(value, indent=2) + "\n")


def read_evaluations(folder: str | os.PathLike) -> dict[str, dict]:
    """Every evaluation of one checkpoint's folder, by kind (the file's stem)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}
