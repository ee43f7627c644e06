"""Image ids: which of a set of ids are among a sorted set of wanted ones (a job's rows, a group's images)."""

from __future__ import annotations

import numpy as np


def in_sorted(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """A mask of the ``ids`` that are in ``wanted`` (sorted, unique): one binary search each."""
    if len(wanted) == 0:
        return np.zeros(len(ids), bool)
    return wanted[np.searchsorted(wanted, ids).clip(max=len(wanted) - 1)] == ids
