"""An evaluation's results, ``{run}/evals/{name}/{kind}.json`` (``linear``, ``knn``, ``nmi``, ``voc07``,
``retrieval``): one JSON object each, whose keys the evaluation's stage documents; ``compare`` reads them back.
``linear.json`` keeps, per probe, which test image it classified right (``test_correct``, packed bits in the order of
the test images, whose ids ``test_ids_sha256`` fingerprints), so that two checkpoints' probes compare image by image
(``deepercluster.evaluate.paired``).
And a run's ``{run}/evals/similarity.tsv``: ``round``, ``layer``, ``weight_cosine``, ``cka``, one row per round and
conv layer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
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


def pack_correct(correct: np.ndarray) -> str:
    """One 0/1 per test image as hex of its packed bits (10,000 images: 2,500 characters)."""
    return np.packbits(np.asarray(correct, bool)).tobytes().hex()


def unpack_correct(packed: str, images: int) -> np.ndarray:
    """``pack_correct``'s bits back, one bool per test image."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8), count=images).astype(bool)


def ids_fingerprint(ids: np.ndarray) -> str:
    """sha256 of the test images' manifest ids in their order: equal only where two probes scored the same images
    in the same order."""
    return hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()
