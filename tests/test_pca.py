"""PCA-whitening fitted by streaming the shards: whiteness, the floor, numpy parity, broken shards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from deepercluster.cluster.pca import fit_pca, sample_rows
from deepercluster.errors import ShardError
from deepercluster.files import sha256
from deepercluster.formats.features import shard_rows
from deepercluster.formats.whitening import Whitening
from defaults import pca_settings

FLOOR = 1e-5  # fit_pca's default eigenvalue_floor


def _write_shards(folder: Path, x: np.ndarray, parts: int) -> list[str]:
    """``x`` as ``parts`` shards in the extraction stage's format, ids 0..n-1 in row order, of the stand-in
    checkpoint ``folder/checkpoint.pt``."""
    (folder / "checkpoint.pt").write_bytes(b"a stand-in for the checkpoint the rows come from")
    paths = []
    for i, (ids, rows) in enumerate(
        zip(np.array_split(np.arange(len(x)), parts), np.array_split(x, parts), strict=True)
    ):
        paths.append(str(folder / f"shard-{i}.h5"))
        with h5py.File(paths[-1], "w") as f:
            f["features"] = rows.astype(np.float32)
            f["ids"] = ids.astype(np.int64)
            f.attrs["checkpoint_sha256"] = sha256(folder / "checkpoint.pt")
    return paths


def _numpy_eigenvalues(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of numpy's sample covariance (ddof=1), largest first."""
    return np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))[::-1]


def test_whitened_unit_variance_zero_mean_unit_norm(real_data, raw_features) -> None:
    _, x = raw_features
    whitening = Whitening.load(real_data.pca)  # fitted on every row: sample_size 100000 >= 600
    with h5py.File(real_data.pca, "r") as f:
        assert f.attrs["sample_size"] == len(x)
    assert whitening.dim == x.shape[1]  # dim None keeps every direction
    z = whitening.whiten(x).astype(np.float64)
    assert np.abs(z.mean(axis=0)).max() < 1e-4
    variance = z.var(axis=0, ddof=1)
    # Directions above the floor are whitened to unit variance; floored ones (a random
    # network's dead ReLUs make these features rank-deficient) keep eigenvalue/floor < 1.
    raw = _numpy_eigenvalues(x)
    unfloored = raw >= FLOOR * raw[0]
    assert 100 < unfloored.sum() < len(raw)
    assert np.allclose(variance[unfloored], 1.0, atol=1e-4)
    assert np.allclose(variance, np.minimum(1.0, raw / (FLOOR * raw[0])), atol=1e-4)
    # Decorrelated too, not only rescaled.
    covariance = np.cov(z[:, unfloored], rowvar=False)
    assert np.abs(covariance - np.eye(unfloored.sum())).max() < 1e-4
    # __call__ L2-normalises each row.
    normalised = whitening(x)
    assert normalised.dtype == np.float32 and normalised.shape == x.shape
    assert np.allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)


def test_dim_keeps_leading_directions(real_data, raw_features, tmp_path: Path) -> None:
    _, x = raw_features
    out = str(tmp_path / "pca32.h5")
    fit_pca(shards=real_data.shards, checkpoint=real_data.checkpoint, out=out, **pca_settings(dim=32))
    whitening, full = Whitening.load(out), Whitening.load(real_data.pca)
    assert whitening.projection.shape == (256, 32) and whitening.eigenvalues.shape == (32,)
    assert whitening.dim == 32 and whitening(x).shape == (len(x), 32)
    assert np.allclose(whitening.eigenvalues, full.eigenvalues[:32], rtol=1e-6)
    assert np.all(np.diff(whitening.eigenvalues) <= 0)  # largest first
    z = whitening.whiten(x).astype(np.float64)
    assert np.abs(np.cov(z, rowvar=False) - np.eye(32)).max() < 1e-4


def test_eigenvalue_floor(real_data, raw_features, tmp_path: Path) -> None:
    _, x = raw_features
    raw = _numpy_eigenvalues(x)
    floor = FLOOR * raw[0]
    assert (raw < floor).sum() > 0  # the real features are rank-deficient
    stored = Whitening.load(real_data.pca).eigenvalues.astype(np.float64)
    assert np.all(stored >= floor * (1 - 1e-6))
    assert np.sum(np.isclose(stored, floor, rtol=1e-6, atol=0)) == np.sum(raw < floor)

    # Rank 3 in 8 dimensions: 5 eigenvalues are 0 (or rounding noise, possibly negative).
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 8)) + 5.0
    shards = _write_shards(tmp_path, low_rank, parts=2)
    fit_pca(
        shards=shards,
        checkpoint=str(tmp_path / "checkpoint.pt"),
        out=str(tmp_path / "pca.h5"),
        **pca_settings(eigenvalue_floor=1e-3),
    )
    whitening = Whitening.load(str(tmp_path / "pca.h5"))
    assert np.all(whitening.eigenvalues >= 1e-3 * whitening.eigenvalues[0] * (1 - 1e-6))
    assert np.isclose(whitening.eigenvalues[3:], 1e-3 * whitening.eigenvalues[0], rtol=1e-6, atol=0).all()
    assert np.isfinite(whitening.projection).all() and np.isfinite(whitening(low_rank)).all()
    z = whitening.whiten(low_rank).astype(np.float64)
    assert np.allclose(z[:, :3].var(axis=0, ddof=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("sample_size", [100_000, 450])
def test_streamed_fit_equals_numpy(real_data, raw_features, tmp_path: Path, sample_size: int) -> None:
    """Running sums over 3 shards give numpy's covariance of the concatenated sample."""
    _, x = raw_features
    out = str(tmp_path / "pca.h5")
    fit_pca(
        shards=real_data.shards,
        checkpoint=real_data.checkpoint,
        out=out,
        **pca_settings(sample_size=sample_size, seed=4),
    )
    whitening = Whitening.load(out)
    counts = [shard_rows(p) for p in real_data.shards]
    sample = x[sample_rows(counts, sample_size, seed=4)].astype(np.float64)
    assert len(sample) == min(sample_size, len(x))

    assert np.allclose(whitening.mean, sample.mean(axis=0), rtol=1e-5, atol=1e-8)
    covariance = np.cov(sample, rowvar=False)
    raw = np.linalg.eigvalsh(covariance)[::-1]
    floored = np.maximum(raw, FLOOR * raw[0])
    assert np.allclose(whitening.eigenvalues, floored, rtol=1e-5, atol=1e-6 * raw[0])
    # The projection's columns are eigenvectors of numpy's covariance over sqrt(eigenvalue):
    # P^T C P = diag(eigenvalue / floored eigenvalue), whatever the signs of the vectors.
    projection = whitening.projection.astype(np.float64)
    assert np.allclose(projection.T @ covariance @ projection, np.diag(raw / floored), atol=1e-4)


def test_truncated_shard_names_file_and_fix(real_data, tmp_path: Path) -> None:
    truncated = tmp_path / "shard-1.h5"
    shutil.copyfile(real_data.shards[1], truncated)
    os.truncate(truncated, truncated.stat().st_size // 2)
    out = tmp_path / "pca.h5"
    with pytest.raises(ShardError) as error:
        fit_pca(
            shards=[real_data.shards[0], str(truncated), real_data.shards[2]],
            checkpoint=real_data.checkpoint,
            out=str(out),
            **pca_settings(),
        )
    message = str(error.value)
    assert str(truncated) in message and "truncated" in message
    assert "delete it and rerun" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [truncated]


def _bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (Linux /proc/self/io)."""
    return int(
        next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1]
    )


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through Linux /proc/self/io")
def test_reads_only_the_sampled_rows(raw_features, tmp_path: Path) -> None:
    """20 MiB of shards, a 100-row sample: about 100 rows are read from disk, and they are the sampled ones."""
    _, x = raw_features
    many = np.tile(x, (34, 1))[:20_000] + np.arange(20_000, dtype=np.float32)[:, None] * 1e-3  # distinct rows
    shards = _write_shards(tmp_path, many, parts=2)
    row_bytes = many.shape[1] * 4
    out = str(tmp_path / "pca.h5")
    before = _bytes_read()
    fit_pca(shards=shards, checkpoint=str(tmp_path / "checkpoint.pt"), out=out, **pca_settings(sample_size=100, seed=2))
    read = _bytes_read() - before
    assert 100 * row_bytes <= read < 100 * row_bytes + 256 * 1024, read  # the rows, and HDF5's metadata
    assert read < many.nbytes / 50
    sample = many[sample_rows([10_000, 10_000], 100, seed=2)].astype(np.float64)
    assert np.allclose(Whitening.load(out).mean, sample.mean(axis=0), rtol=1e-6, atol=1e-6)
