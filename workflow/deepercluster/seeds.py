"""Seeded random keys without a random generator: splitmix64, vectorised over numpy arrays.

Used where a key must depend only on what it is for, not on where or in which order it is
drawn: k-means' initial centroids (one key per image id, the same on any number of ranks)
and the augmentation seed of every sample of an epoch (one key per position, the same after
a resume or with any number of DataLoader workers).
"""

from __future__ import annotations

import numpy as np


def id_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, id): a seeded random 64-bit key per id."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids).astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def derived_seed(seed: int, *keys: int) -> int:
    """One seed from ``seed`` and ``keys`` (e.g. epoch, group), each hashed in turn."""
    for key in keys:
        seed = int(id_hash(np.array([key]), seed)[0])
    return seed
