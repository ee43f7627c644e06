"""The uncurated pool (``data.uncurated``): a long tail over the classes, near-duplicates and distractors, drawn
from Fashion-MNIST's training split by the manifest stage, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepercluster.data.composition import main
from deepercluster.data.images import ImageDataset
from deepercluster.data.manifest import FASHION_MNIST_CLASSES, build_manifest
from deepercluster.data.pools import DUPLICATES_EACH, class_sizes
from deepercluster.errors import DataError
from deepercluster.formats.manifest import read_manifest, write_manifest
from defaults import manifest_settings

SETTINGS = {"tail_ratio": 50.0, "duplicate_share": 0.1, "distractor_share": 0.1}


def pool(folder: Path, seed: int = 0, **changes: object) -> pd.DataFrame:
    """The manifest of an uncurated pool of 2,000 training images under ``folder``."""
    settings = {"max_images": 2000, "split": "train", "uncurated": SETTINGS, "seed": seed, **changes}
    build_manifest(
        source="fashion-mnist",
        path=str(folder.parent / "fashion-mnist"),
        manifest=str(folder / "manifest.parquet"),
        skipped=str(folder / "skipped.tsv"),
        **manifest_settings(**settings),
    )
    return read_manifest(str(folder / "manifest.parquet"))


def test_class_sizes_fall_from_head_to_tail_by_the_ratio() -> None:
    sizes = class_sizes(1600, 10, 50.0)
    assert sizes.sum() == 1600 and (np.diff(sizes) <= 0).all()
    assert sizes[0] / sizes[-1] == pytest.approx(50, rel=0.05)  # floored counts: 400 / 8


def test_the_pool_holds_a_long_tail_near_duplicates_and_distractors(tmp_path: Path) -> None:
    frame = pool(tmp_path / "a")
    assert len(frame) == 2000 and frame["id"].tolist() == list(range(2000))
    kinds = frame["kind"].str.split("-").str[0].value_counts()
    assert kinds.to_dict() == {"original": 1600, "duplicate": 200, "distractor": 200}
    originals = frame[frame["kind"] == "original"]
    counts = originals["label"].value_counts()
    assert set(counts.index) == set(FASHION_MNIST_CLASSES) and counts.max() / counts.min() == pytest.approx(
        50, rel=0.05
    )
    assert (frame.loc[frame["kind"].str.startswith("distractor"), "label"] == "none").all()
    # An original is the curated file of its training image; a near-duplicate is close to its original.
    assert originals["path"].str.contains(r"/fashion-mnist/train/\d/\d{5}\.png$").all()
    duplicates = frame[frame["kind"] == "duplicate"]
    assert (duplicates.groupby("original").size() == DUPLICATES_EACH).all()
    images = ImageDataset(frame, lambda image: np.asarray(image, np.float64)[..., 0])
    first = duplicates.index[0]
    source = originals.index[originals["original"] == duplicates.loc[first, "original"]]
    near = np.abs(images[first][0] - images[source[0]][0]).mean() if len(source) else None
    other = np.abs(images[first][0] - images[int(originals.index[0])][0]).mean()
    assert near is None or near < other / 2
    # Every distractor kind is there, and each decodes.
    assert set(frame["kind"]) >= {f"distractor-{k}" for k in ("blank", "noise", "gradient", "text")}
    assert all(images[i][0].shape == (28, 28) for i in frame.index[frame["label"] == "none"][:8])


def test_the_pool_is_seeded(tmp_path: Path) -> None:
    first, again, other = pool(tmp_path / "a"), pool(tmp_path / "b"), pool(tmp_path / "c", seed=1)
    assert first.equals(again)
    assert not first[["label", "original"]].equals(other[["label", "original"]])


def test_a_pool_needs_its_size_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"set data.max_images and data.split \(now None, train\)"):
        pool(tmp_path / "a", max_images=None)
    with pytest.raises(DataError, match=r"lower data\.max_images"):
        pool(tmp_path / "b", max_images=59_000)


def test_composition_counts_what_a_pool_and_a_subset_hold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frame = pool(tmp_path / "a")
    # A subset: every picture once (the originals) and the 50 first distractors, with the pool's columns.
    subset = pd.concat([frame[frame["kind"] == "original"], frame[frame["label"] == "none"].head(50)])
    write_manifest(tmp_path / "subset.parquet", subset.assign(id=range(len(subset))))
    main([f"pool={tmp_path / 'a' / 'manifest.parquet'}", f"subset={tmp_path / 'subset.parquet'}"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines}
    largest, smallest = frame.loc[frame["label"] != "none", "label"].value_counts().iloc[[0, -1]]
    assert rows["pool"][:6] == [
        "2000",
        "200 (10.0%)",  # the distractors
        "200 (10.0%)",  # the near-duplicates
        "200 (10.0%)",  # copies beyond the first: 20 pictures x 10 copies
        "10 of 10",
        f"{largest} / {smallest}",
    ]
    assert rows["subset"][:5] == ["1650", "50 (3.0%)", "0 (0.0%)", "0 (0.0%)", "10 of 10"]
    entropy = {name: float(rows[name][6].strip(" |")) for name in ("pool", "subset")}
    assert 0.5 < entropy["pool"] < 1 and 0.5 < entropy["subset"] < 1
    # Each class's share of the labelled images, the pool's largest first.
    head = next(line for line in lines if line.startswith("| class "))
    first = lines[lines.index(head) + 2].split(" | ")
    assert first[1] == f"{largest} ({100 * largest / 1800:.1f}%)"


def test_composition_names_a_manifest_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_manifest(tmp_path / "bare.parquet", pd.DataFrame({"id": [0], "path": ["a.png"]}))
    with pytest.raises(SystemExit, match="1"):
        main([f"bare={tmp_path / 'bare.parquet'}"])
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'bare.parquet'} has no column 'label'; name one of: id, path\n"
    )
