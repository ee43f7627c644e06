"""A clusters file (``clusters/super.h5``, ``clusters/sub-{s}.h5``, an evaluation's ``clusters.h5``): one k-means
result, ``centroids`` ([k, d] float32), ``ids`` and ``assignments`` (int64, sorted by id), ``sizes`` ([k]),
``objective`` and ``reseeded`` (one value per assignment pass), and attributes (``k``, ``level``, ``seed``,
``pca_sha256``...; ``super_cluster`` and ``super_sha256`` for level 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from deepercluster.errors import ClustersError
from deepercluster.files import atomic_output


@dataclass
class Clusters:
    """A k-means result: every rank's rows once written (``kmeans`` returns one rank's own rows)."""

    centroids: np.ndarray | None  # [k, dim] float32 (None when read without them)
    ids: np.ndarray  # [n] int64
    assignments: np.ndarray  # [n] int64: cluster of each of those rows
    sizes: np.ndarray  # [k] int64, empty clusters included (0): over every rank
    objective: np.ndarray  # [passes]: sum of squared distances at each assignment pass
    reseeded: np.ndarray  # [passes]: empty clusters re-seeded after each pass
    attrs: dict[str, object] = field(default_factory=dict)  # level, seed, ... (super_cluster for level 2), k


DATASETS = ("ids", "assignments", "sizes", "objective", "reseeded")


def write_clusters(path: str, clusters: Clusters) -> None:
    """A clusters file, ``ids`` and ``assignments`` sorted by id, its attributes with ``k``."""
    order = np.argsort(clusters.ids)
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f["centroids"] = clusters.centroids
        f["ids"] = clusters.ids[order]
        f["assignments"] = clusters.assignments[order]
        f["objective"] = clusters.objective
        f["reseeded"] = clusters.reseeded
        f["sizes"] = clusters.sizes
        f.attrs.update(k=len(clusters.sizes), **clusters.attrs)


def read_clusters(path: str, centroids: bool = False) -> Clusters:
    """A clusters file in one read (its centroids only if asked: k x d floats); a missing, truncated or foreign
    one gets one message and the fix."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise ClustersError(f"clusters file {path} is unreadable ({error}): delete it and rerun its stage") from error
    with f:
        missing = [name for name in DATASETS if name not in f]
        if missing:
            names = ", ".join(missing)
            raise ClustersError(f"{path} lacks the datasets {names}, so it is no clusters file: delete it and rerun")
        found = {name: f[name][:] for name in DATASETS}
        return Clusters(f["centroids"][:] if centroids else None, **found, attrs=dict(f.attrs))
