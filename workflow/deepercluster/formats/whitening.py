"""``pca.h5``: a ``Whitening``, the PCA-whitening the k-means levels apply before L2 normalisation: ``mean``,
``projection``, ``eigenvalues`` (float32) and the fit's attributes (``checkpoint_sha256``, ``sample_size``...)."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from deepercluster.files import atomic_output


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` L2-normalised (a zero row stays zero), in ``x``'s dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Whitening:
    """x -> L2-normalise((x - mean) @ projection), projection = eigenvectors * eigenvalue^-1/2."""

    mean: np.ndarray  # [d_in]
    projection: np.ndarray  # [d_in, d_out]
    eigenvalues: np.ndarray  # [d_out], after the floor

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Whitened features before L2: unit variance along every kept direction on the fitted sample."""
        return ((x - self.mean) @ self.projection).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return unit_rows(self.whiten(x))

    @classmethod
    def load(cls, path: str) -> Whitening:
        with h5py.File(path, "r") as f:
            return cls(f["mean"][:], f["projection"][:], f["eigenvalues"][:])

    def save(self, path: str, **attrs: object) -> None:
        """``pca.h5``: the three arrays as float32, and ``attrs`` (``checkpoint_sha256``, ``sample_size``...)."""
        with atomic_output(path) as partial, h5py.File(partial, "w") as f:
            f["mean"] = self.mean.astype(np.float32)
            f["projection"] = self.projection.astype(np.float32)
            f["eigenvalues"] = self.eigenvalues.astype(np.float32)
            f.attrs.update(attrs)


def whitening_checkpoint(path: str) -> str:
    """The sha256 of the checkpoint whose features a ``pca.h5`` was fitted on."""
    with h5py.File(path, "r") as f:
        return str(f.attrs["checkpoint_sha256"])
