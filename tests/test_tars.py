"""Images in tar shards (``data.source: tar``): indexed from the headers, read by positioned reads, the same images
as a folder giving the same manifest rows, pixels, features, labels and weights; each bad tar one line."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from benchmarks.collection import add_member

from deepercluster.data.images import ImageDataset
from deepercluster.data.manifest import build_manifest, join_evaluation
from deepercluster.errors import DataError, UnreadableImageError
from deepercluster.formats.manifest import metadata_columns, read_manifest, write_manifest
from defaults import manifest_settings
from test_workflow import snakemake

IMAGES = 300  # the test config's


def fashion_folder(folder: Path, images: int) -> pd.DataFrame:
    """``images`` Fashion-MNIST images as PNGs under ``folder/{class}/``, and their manifest as a folder gives it."""
    pngs = folder.parent / f"{folder.name}-pngs"
    build_manifest(
        source="fashion-mnist",
        path=str(pngs),
        manifest=str(folder.parent / "fm.parquet"),
        skipped=str(folder.parent / "fm.tsv"),
        **manifest_settings(max_images=images, split=None),
    )
    for _, row in read_manifest(str(folder.parent / "fm.parquet")).iterrows():
        target = folder / row["label"].replace("/", "-") / f"{row['split']}-{Path(row['path']).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row["path"], target)
    return build(folder.parent / "folder", source="folder", path=str(folder))


def build(out: Path, **settings: object) -> pd.DataFrame:
    """The manifest of ``settings`` written under ``out``, read back."""
    out.mkdir(parents=True, exist_ok=True)
    build_manifest(
        manifest=str(out / "manifest.parquet"),
        skipped=str(out / "skipped.tsv"),
        **manifest_settings(**{"max_images": None, "split": None, **settings}),
    )
    return read_manifest(str(out / "manifest.parquet"))


def write_tars(folder: pd.DataFrame, out: Path, per_tar: int) -> list[Path]:
    """The images of a folder manifest as WebDataset tars of ``per_tar``, in its order: ``{key}.png``, its class as
    ``{key}.cls`` and ``{key}.json`` holding its file name."""
    out.mkdir(parents=True, exist_ok=True)
    tars = []
    for start in range(0, len(folder), per_tar):
        tars.append(out / f"shard-{start // per_tar:06d}.tar")
        with tarfile.open(tars[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, row in folder.iloc[start : start + per_tar].iterrows():
                add_member(tar, f"{i:06d}.png", Path(row["path"]).read_bytes())
                add_member(tar, f"{i:06d}.cls", row["label"].encode())
                add_member(tar, f"{i:06d}.json", json.dumps({"file": Path(row["path"]).name, "index": int(i)}).encode())
    return tars


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, list[Path]]:
    """60 Fashion-MNIST images as a folder (its manifest) and as 3 tars of 20."""
    root = tmp_path_factory.mktemp("collection")
    folder = fashion_folder(root / "images", 60)
    return folder, write_tars(folder, root / "tars", 20)


def test_tars_index_to_the_folders_rows_and_pixels(collection: tuple[pd.DataFrame, list[Path]], tmp_path: Path) -> None:
    folder, tars = collection
    frame = build(tmp_path, source="tar", path=str(tars[0].parent), workers=2)
    assert frame["id"].tolist() == list(range(60)) and frame["key"].tolist() == [f"{i:06d}" for i in range(60)]
    assert frame["label"].tolist() == folder["label"].tolist()
    assert frame["file"].tolist() == [Path(p).name for p in folder["path"]] and frame["index"].tolist() == list(
        range(60)
    )
    assert frame["path"].tolist() == [str(tars[i // 20]) for i in range(60)]
    assert metadata_columns(frame) == ["label", "file", "index"]  # what the images show; not where they lie
    ours, theirs = ImageDataset(frame, np.asarray), ImageDataset(folder, np.asarray)
    for i in range(60):
        assert np.array_equal(ours[i][0], theirs[i][0]) and ours[i][1] == theirs[i][1] == i
    # A glob names the same tars; a sample of 5 decoded, the others only indexed.
    again = build(tmp_path / "glob", source="tar", path=str(tars[0].parent / "shard-*.tar"), verify_images="5")
    assert again.drop(columns="path").equals(frame.drop(columns="path"))


def test_an_evaluation_manifest_joins_tar_images_and_files(
    collection: tuple[pd.DataFrame, list[Path]], tmp_path: Path
) -> None:
    """The train role from a tar, the test role from files: each image's pixels as its own manifest reads them."""
    folder, tars = collection
    train = build(tmp_path / "train", source="tar", path=str(tars[0]))
    write_manifest(tmp_path / "test.parquet", folder)
    join_evaluation(
        train=str(tmp_path / "train/manifest.parquet"), test=str(tmp_path / "test.parquet"), out=str(tmp_path / "e.pq")
    )
    joined = ImageDataset(read_manifest(str(tmp_path / "e.pq")), np.asarray)
    alone = [ImageDataset(train, np.asarray), ImageDataset(folder, np.asarray)]
    assert len(joined) == 20 + 60
    for i in range(len(joined)):
        assert np.array_equal(joined[i][0], alone[i >= 20][i - 20 * (i >= 20)][0])


def test_an_unreadable_member_is_skipped_and_named(collection: tuple[pd.DataFrame, list[Path]], tmp_path: Path) -> None:
    folder, _ = collection
    tars = write_tars(folder.iloc[:4], tmp_path / "tars", 4)
    with tarfile.open(tars[0], "a") as tar:
        add_member(tar, "notes.jpg", b"these are notes, not a JPEG")
    frame = build(tmp_path, source="tar", path=str(tars[0]))
    skipped = pd.read_csv(tmp_path / "skipped.tsv", sep="\t")
    assert len(frame) == 4 and skipped["path"].tolist() == [f"{tars[0]}:notes"]
    assert skipped["error"].str.contains(f"cannot identify image file {tars[0]} bytes [0-9]+ to [0-9]+").all()


@pytest.mark.parametrize("fault", ["truncated", "no images", "same key", "not a tar"])
def test_a_bad_tar_is_one_line_naming_it(
    collection: tuple[pd.DataFrame, list[Path]], tmp_path: Path, fault: str
) -> None:
    folder, _ = collection
    tars = write_tars(folder.iloc[:6], tmp_path / "tars", 3)
    if fault == "truncated":
        os.truncate(tars[1], tars[1].stat().st_size // 2)
        expected = rf"{tars[1]} is (truncated|not a readable tar).*replace it with a complete copy"
    elif fault == "no images":
        with tarfile.open(tars[1], "w") as tar:
            add_member(tar, "000001.cls", b"Bag")
        expected = rf"{tars[1]} holds no image members.*move it out of data.path"
    elif fault == "same key":
        shutil.copyfile(tars[0], tars[1])
        expected = rf"{tars[0]} and {tars[1]} both hold the key '000000'.*remove one of the copies"
    else:
        tars[1].write_bytes(b"x" * 1000)
        expected = rf"{tars[1]} is not a readable tar.*replace it with a complete copy"
    with pytest.raises(DataError, match=expected) as raised:
        build(tmp_path, source="tar", path=str(tmp_path / "tars"))
    assert "\n" not in str(raised.value) and not (tmp_path / "manifest.parquet").exists()


@pytest.mark.parametrize("fault", ["deleted", "changed"])
def test_a_tar_gone_or_changed_after_the_manifest_is_refused(
    collection: tuple[pd.DataFrame, list[Path]], tmp_path: Path, fault: str
) -> None:
    folder, _ = collection
    tars = write_tars(folder.iloc[:4], tmp_path / "tars", 2)
    frame = build(tmp_path, source="tar", path=str(tmp_path / "tars"), verify_images="none")
    if fault == "deleted":
        tars[1].unlink()
        expected = rf"cannot open {tars[1]} \(No such file or directory\); restore it"
    else:
        with open(tars[1], "ab") as tar:
            tar.write(b"\0" * 512)
        expected = rf"{tars[1]} changed since results/data/manifest.parquet was built.*delete the manifest and rerun"
    images = ImageDataset(frame, np.asarray)
    assert images[1][1] == 1  # the first tar still reads
    with pytest.raises(UnreadableImageError, match=expected):
        images[2]


def test_one_round_from_tars_equals_the_same_images_as_a_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test config's round 1 on 300 images as a folder and as 4 tars: the same features, labels and weights
    (the checkpoints' provenance names each run's own manifest, so their bytes differ there alone)."""
    root = tmp_path_factory.mktemp("same-round")
    folder = fashion_folder(root / "images", IMAGES)
    write_tars(folder, root / "tars", 80)
    runs = {}
    for source, path in {"folder": root / "images", "tar": root / "tars"}.items():
        runs[source] = root / f"run-{source}"
        runs[source].mkdir()
        done = snakemake(
            runs[source],
            "results/rounds/1/checkpoint.pt",
            data={"source": source, "path": str(path), "max_images": IMAGES, "image_size": 32, "workers": 0},
        )
        assert done.returncode == 0, done.stderr[-3000:]
    folder_run, tar_run = (runs[s] / "results/rounds/1" for s in ("folder", "tar"))
    for shard in ("features/shard-0.h5", "features/shard-1.h5"):
        with h5py.File(folder_run / shard) as a, h5py.File(tar_run / shard) as b:
            assert np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["ids"][:], b["ids"][:])
    assert pd.read_parquet(folder_run / "labels.parquet").equals(pd.read_parquet(tar_run / "labels.parquet"))
    weights = [torch.load(run / "checkpoint.pt", weights_only=False)["model"] for run in (folder_run, tar_run)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
