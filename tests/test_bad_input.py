"""Bad input, each told in one line naming the file and the fix, with nothing finished lost.

Every case is a small real run: the stage functions, ``python -m deepercluster``, or
snakemake on the test config. Only errors of the user's input get the one-line message; a
bug keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from deepercluster.__main__ import main
from deepercluster.checkpoints import initial_checkpoint, load_checkpoint, non_finite_weights
from deepercluster.cluster.levels import cluster_flat, cluster_super
from deepercluster.config import ConfigError, validate_config
from deepercluster.data.images import ImageDataset
from deepercluster.data.manifest import build_manifest
from deepercluster.errors import ClustersError, ShardError, TrainingInputError
from deepercluster.features import extract_features
from deepercluster.formats.manifest import read_manifest
from deepercluster.nn.models import build_model
from deepercluster.stages import options
from defaults import (
    block_settings,
    feature_settings,
    kmeans_settings,
    manifest_command,
    manifest_settings,
    pca_settings,
    run_block,
    shard_settings,
)
from test_workflow import TEST_CONFIG, snakemake

pytestmark = pytest.mark.usefixtures("single_process")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepercluster", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The error line of a stage that failed on its input: exit 1, no traceback, the message on its last line."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


# The manifest stage's settings from the schema's defaults, every image kept.
MANIFEST_SETTINGS = shlex.split(options(**manifest_settings(max_images=None, split=None)))


def table_manifest(table: Path, manifest: Path, skipped: Path) -> str:
    """The one line the manifest stage stops with on ``table`` (source table, every image kept)."""
    return one_line_error(
        cli(
            *manifest_command(
                source="table",
                path=str(table),
                manifest=str(manifest),
                skipped=str(skipped),
                max_images=None,
                split=None,
            )
        )
    )


def manifest_of(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(
        "manifest",
        *("--source", "folder", "--path", str(folder)),
        *MANIFEST_SETTINGS,
        *("--manifest", str(out / "manifest.parquet"), "--skipped", str(out / "skipped.tsv"), *extra),
    )


# 1. Only the user's input gets the one-line message.


def test_an_input_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = one_line_error(manifest_of(tmp_path / "empty", tmp_path))
    assert f"no readable images in {tmp_path / 'empty'}" in line and "fix data.path" in line
    # A bug reaching a stage through the command line: labels, checkpoints and folders the rules always pair.
    done = cli(
        "compare",
        *("--labels", "a", "b", "--checkpoints", "x", "y", "--evals", "x"),
        *("--out", str(tmp_path / "table.md"), "--tsv", str(tmp_path / "table.tsv")),
        *("--plot", str(tmp_path / "linear.png"), "--label-column", "label"),
    )
    assert (
        done.returncode == 1 and "Traceback" in done.stderr and "ValueError: 2 labels, 2 checkpoints, 1" in done.stderr
    )


def test_main_lets_a_programming_error_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import deepercluster.data.manifest

    @functools.wraps(deepercluster.data.manifest.build_manifest)  # the same options
    def broken(**_: object) -> None:
        raise FileNotFoundError("a bug, not the user's input")

    monkeypatch.setattr(deepercluster.data.manifest, "build_manifest", broken)
    args = [
        "manifest",
        "--source",
        "folder",
        "--path",
        str(tmp_path),
        "--manifest",
        "m",
        "--skipped",
        "s",
        *shlex.split(options(**manifest_settings())),
    ]
    with pytest.raises(FileNotFoundError, match="a bug"):
        main(args)
    with pytest.raises(TypeError):  # a wrong type through the Python API
        build_manifest(source="folder", path=None, manifest="m", skipped="s", **manifest_settings())


# 2. Bad input.


def rgb_image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_empty_and_fake_images_are_skipped_and_listed(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    good = rgb_image(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image, only a name")
    done = manifest_of(folder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_manifest(str(tmp_path / "manifest.parquet"))["path"].tolist() == [str(good)]
    skipped = pd.read_csv(tmp_path / "skipped.tsv", sep="\t")
    assert sorted(skipped["path"]) == [str(folder / "empty.png"), str(folder / "notes.png")]
    assert skipped["error"].str.contains("cannot identify image file").all()
    assert "2 unreadable images skipped; they are listed in" in done.stderr


def test_every_image_mode_is_read_as_8_bit_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(folder / "cmyk.jpg")  # magenta
    Image.fromarray(np.array([[65535, 32768], [257, 0]], np.uint16)).save(folder / "grey16.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "rgba.png")
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2, 200, 100, 50])
    palette.save(folder / "palette.png")
    Image.new("1", (8, 8), 1).save(folder / "bits.png")
    assert Image.open(folder / "grey16.png").mode == "I;16"

    frame, _ = build(tmp_path, folder)
    assert len(frame) == 5 and pd.read_csv(tmp_path / "skipped.tsv", sep="\t").empty
    read = ImageDataset(frame, np.asarray)
    pixels = {Path(path).name: read[i][0] for i, path in enumerate(frame["path"])}
    assert all(p.dtype == np.uint8 and p.shape[2] == 3 for p in pixels.values())
    assert np.abs(pixels["cmyk.jpg"][4, 4].astype(int) - [255, 0, 255]).max() <= 2  # JPEG is lossy
    # 16-bit grey scales to 8 bits (65535 -> 255, 32768 -> 128, 257 -> 1), not clipped at 255.
    assert pixels["grey16.png"][..., 0].tolist() == [[255, 128], [1, 0]]
    assert (pixels["grey16.png"] == pixels["grey16.png"][..., :1]).all()
    assert pixels["rgba.png"][0, 0].tolist() == [10, 20, 30]  # alpha dropped
    assert pixels["palette.png"][0, 0].tolist() == [200, 100, 50]
    assert pixels["bits.png"][0, 0].tolist() == [255, 255, 255]


def build(tmp_path: Path, folder: Path, **kwargs: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    build_manifest(
        source="folder",
        path=str(folder),
        manifest=str(tmp_path / "manifest.parquet"),
        skipped=str(tmp_path / "skipped.tsv"),
        **manifest_settings(**{"max_images": None, "split": None, **kwargs}),
    )
    return read_manifest(str(tmp_path / "manifest.parquet")), pd.read_csv(tmp_path / "skipped.tsv", sep="\t")


# Run a stage in this process, then print its peak resident memory in MB.
PEAK_MB = (
    "import resource, sys; from deepercluster.__main__ import main; assert main(sys.argv[1:]) == 0; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)


def test_an_8000_pixel_jpeg_is_read_in_bounded_memory(real_data, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    rgb_image(folder / "huge.jpg", (200, 100, 50), size=(8000, 8000))
    rgb_image(folder / "small.png", (1, 2, 3))
    done = manifest_of(folder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(read_manifest(str(tmp_path / "manifest.parquet"))) == 2
    assert pd.read_csv(tmp_path / "skipped.tsv", sep="\t").empty
    # The features stage's peak memory on the big image alone, against the small one alone.
    frame = read_manifest(str(tmp_path / "manifest.parquet"))
    peaks = {}
    for name in ("huge.jpg", "small.png"):
        manifest, out = tmp_path / f"{name}.parquet", tmp_path / f"{name}.h5"
        frame[frame["path"].str.endswith(name)].to_parquet(manifest)
        stage = [
            "features",
            "--manifest",
            str(manifest),
            "--checkpoint",
            real_data.checkpoint,
            "--shard",
            "0",
            "--shard-size",
            "10",
            "--image-size",
            "32",
            "--batch-size",
            "64",
            "--workers",
            "0",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
        measured = subprocess.run(
            [sys.executable, "-c", PEAK_MB, *stage], capture_output=True, text=True, timeout=300, check=True
        )
        peaks[name] = float(measured.stdout.split()[-1])
        with h5py.File(out) as f:
            assert f["features"].shape == (1, 256) and np.isfinite(f["features"][:]).all()
    # Decoded whole, the JPEG takes 8000 x 8000 x 3 bytes twice (~370 MB more); drafted, ~12 MB.
    assert peaks["huge.jpg"] - peaks["small.png"] < 150, peaks


def test_spaces_and_non_ascii_names_work_end_to_end(real_data, tmp_path: Path) -> None:
    folder = tmp_path / "mes images été"
    names = ["a b.png", "çà et là.jpg", "日本 語.png"]
    for i, name in enumerate(names):
        rgb_image(folder / "classe ü" / name, (40 * i, 50, 60))
    done = manifest_of(folder, tmp_path)
    assert done.returncode == 0, done.stderr
    frame = read_manifest(str(tmp_path / "manifest.parquet"))
    assert sorted(Path(p).name for p in frame["path"]) == sorted(names)
    assert set(frame["label"]) == {"classe ü"}
    out = tmp_path / "shard é.h5"
    extract_features(
        manifest=str(tmp_path / "manifest.parquet"),
        checkpoint=real_data.checkpoint,
        shard=0,
        shard_size=10,
        out=str(out),
        **shard_settings(),
    )
    with h5py.File(out) as f:
        assert f["ids"][:].tolist() == [0, 1, 2]
        assert not np.allclose(f["features"][0], f["features"][1])


def write_table(path: Path, column: str, paths: list[str]) -> Path:
    pd.DataFrame({column: paths, "user": [f"u{i}" for i in range(len(paths))]}).to_csv(path, index=False)
    return path


def test_a_table_without_its_path_column(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv", "file", ["a.png"])
    line = table_manifest(table, tmp_path / "m.parquet", tmp_path / "s.tsv")
    assert f"{table} has no column 'path' (it has file, user); set data.path_column" in line


def test_a_table_of_missing_files(tmp_path: Path) -> None:
    good = rgb_image(tmp_path / "here.png")
    table = write_table(tmp_path / "t.csv", "path", ["here.png", "gone.png", "never/there.jpg"])
    # Missing files are skipped and listed even when images are not decoded.
    build_manifest(
        source="table",
        path=str(table),
        manifest=str(tmp_path / "m.parquet"),
        skipped=str(tmp_path / "s.tsv"),
        **manifest_settings(verify_images="none", split=None),
    )
    assert read_manifest(str(tmp_path / "m.parquet"))["path"].tolist() == [str(good)]
    skipped = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert skipped["path"].tolist() == [str(tmp_path / "gone.png"), str(tmp_path / "never" / "there.jpg")]
    assert (skipped["error"] == "FileNotFoundError: no such file").all()
    # None readable: one error naming one of them and where the others are listed.
    table = write_table(tmp_path / "none.csv", "path", ["gone.png"])
    line = table_manifest(table, tmp_path / "m2.parquet", tmp_path / "s2.tsv")
    assert f"no readable images in {table}" in line and str(tmp_path / "gone.png") in line
    assert str(tmp_path / "s2.tsv") in line and not (tmp_path / "m2.parquet").exists()


def test_a_table_listing_a_path_twice(tmp_path: Path) -> None:
    rgb_image(tmp_path / "one.png")
    rgb_image(tmp_path / "two.png")
    table = write_table(tmp_path / "t.csv", "path", ["one.png", "two.png", str(tmp_path / "one.png")])
    line = table_manifest(table, tmp_path / "m.parquet", tmp_path / "s.tsv")
    assert f"{table} lists {tmp_path / 'one.png'} 2 times (rows 1, 3" in line and "keep one row per image" in line
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"methods": {"rotnet": {"rounds": 0}}}, "methods.rotnet.rounds: 0 is less than the minimum of 1"),
        (
            {"methods": {"deepercluster": {"sub_clusters": 0}}},
            "methods.deepercluster.sub_clusters: 0 is less than the minimum of 1",
        ),
        ({"train": {"batch_size": 0}}, "train.batch_size: 0 is less than the minimum of 2"),
        ({"features": {"shard_size": "1000"}}, "features.shard_size: '1000' is not of type 'integer'"),
        ({"methods": {"deepcluster": {"lr": "fast"}}}, "methods.deepcluster.lr: 'fast' is not of type 'number'"),
        ({"seed": -1}, "seed: -1 is less than the minimum of 0"),
        ({"train": {"momentum": 1.5}}, "train.momentum: 1.5 is greater than or equal to the maximum of 1"),
        ({"train": {"dropout": 1}}, "train.dropout: 1 is greater than or equal to the maximum of 1"),
    ],
)
def test_the_schema_rejects_bad_values_by_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(override)


def test_every_number_in_the_schema_is_bounded() -> None:
    import yaml

    from deepercluster.config import SCHEMA

    def numbers(node: dict, key: str = "") -> list[tuple[str, dict]]:
        found = []
        kinds = node.get("type", [])
        if {"integer", "number"} & set([kinds] if isinstance(kinds, str) else kinds):
            found.append((key, node))
        for name, child in node.get("properties", {}).items():
            found += numbers(child, f"{key}.{name}".strip("."))
        for name, child in node.get("$defs", {}).items():
            found += numbers(child, f"$defs.{name}")
        return found

    unbounded = [
        key
        for key, node in numbers(yaml.safe_load(SCHEMA.read_text()))
        if not {"minimum", "exclusiveMinimum"} & set(node)
    ]
    assert unbounded == []


def test_more_super_clusters_than_images(real_data, tmp_path: Path) -> None:
    with pytest.raises(ClustersError, match=r"methods\.deepercluster\.super_clusters is 601, more than the 600 images"):
        cluster_super(
            shards=real_data.shards,
            pca=real_data.pca,
            out=str(tmp_path / "super.h5"),
            super_clusters=601,
            **kmeans_settings(iterations=1),
        )
    assert not (tmp_path / "super.h5").exists()


def test_more_super_clusters_than_images_at_parse_time(tmp_path: Path) -> None:
    run = snakemake(tmp_path, "results/data/manifest.parquet")
    assert run.returncode == 0, run.stderr[-3000:]
    methods = yaml.safe_load(TEST_CONFIG.read_text())["methods"]
    run = snakemake(
        tmp_path, "-n", methods={**methods, "deepercluster": {**methods["deepercluster"], "super_clusters": 301}}
    )
    assert run.returncode != 0
    assert "methods.deepercluster.super_clusters is 301, more than the 300 images: set it to at most 300" in (
        run.stderr + run.stdout
    )


def test_a_truncated_shard_given_to_pca(real_data, tmp_path: Path) -> None:
    truncated = tmp_path / "shard-0.h5"
    data = Path(real_data.shards[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    line = one_line_error(
        cli(
            "pca",
            "--shards",
            str(truncated),
            *real_data.shards[1:],
            "--checkpoint",
            real_data.checkpoint,
            "--out",
            str(tmp_path / "pca.h5"),
            *shlex.split(options(**pca_settings())),
        )
    )
    assert f"feature shard {truncated} is unreadable" in line and "delete it and rerun snakemake" in line
    assert not (tmp_path / "pca.h5").exists()


def test_a_registered_checkpoint_that_cannot_be_used(real_data, tmp_path: Path) -> None:
    out = str(tmp_path / "imported.pt")
    missing = tmp_path / "nowhere.pt"
    line = one_line_error(cli("import-checkpoint", "--source", str(missing), "--out", out, "--sobel"))
    assert f"checkpoint {missing} does not exist: check its path under checkpoints: in the config" in line
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    line = one_line_error(cli("import-checkpoint", "--source", str(text), "--out", out, "--sobel"))
    assert f"checkpoint {text} is unreadable" in line and "not a PyTorch file" in line
    line = one_line_error(
        cli("import-checkpoint", "--source", real_data.checkpoint, "--arch", "alexnet_bn", "--sobel", "--out", out)
    )
    assert f"{real_data.checkpoint} is a small_convnet with sobel=True, its checkpoints entry says alexnet_bn" in line
    foreign = tmp_path / "alexnet.pth"
    torch.save(build_model("alexnet_bn", sobel=False).state_dict(), foreign)
    line = one_line_error(
        cli("import-checkpoint", "--source", str(foreign), "--arch", "small_convnet", "--no-sobel", "--out", out)
    )
    assert f"{foreign} is not a state dict of small_convnet with sobel=False (" in line and "keys unexpected" in line
    assert not Path(out).exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 32 MB tmpfs at tmp_path/disk, unmounted at the end; skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file leaving ``leave_bytes`` free on ``disk``."""
    usage = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, usage.f_bavail * usage.f_frsize - leave_bytes))
    return filler


def test_a_full_disk_is_named_and_the_rerun_keeps_finished_outputs(tmp_path: Path, small_disk: Path) -> None:
    workdir = tmp_path / "run"
    (workdir / "results").mkdir(parents=True)
    (workdir / "results" / "rounds").symlink_to(small_disk)  # the rounds' files on the small disk, the logs not
    finished = ["results/data/manifest.parquet", "results/rounds/0/checkpoint.pt"]
    run = snakemake(workdir, *finished)
    assert run.returncode == 0, run.stderr[-3000:]
    before = {path: (workdir / path).stat().st_mtime_ns for path in finished}

    filler = fill(small_disk, 64 << 10)  # less than one 150 x 256 float32 shard
    shard = "results/rounds/1/features/shard-0.h5"
    run = snakemake(workdir, shard)
    assert run.returncode != 0
    log = (workdir / "results/logs/rounds/1/features/shard-0.log").read_text()
    assert "Traceback" not in log, log
    assert f"no space left on the disk of {shard} while writing it: free space there" in log
    assert not (workdir / shard).exists() and not list(small_disk.rglob("*.partial"))
    # torch.save reports a full disk without an errno: the same message.
    line = one_line_error(
        cli("init", "--arch", "small_convnet", "--sobel", "--seed", "0", "--out", str(small_disk / "x.pt"))
    )
    assert f"no space left on the disk of {small_disk / 'x.pt'}" in line and not (small_disk / "x.pt").exists()

    filler.unlink()
    run = snakemake(workdir, shard)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (workdir / shard).is_file()
    assert {path: (workdir / path).stat().st_mtime_ns for path in finished} == before


# 3. Non-finite numbers and another checkpoint's features: refused where they are read, naming what made them.


@pytest.mark.parametrize(
    ("lr", "diverged"),
    [
        (10.0, "model (by last.pt's names) hold non-finite values after its step"),  # BatchNorm's variance: inf
        (1000.0, "the loss of the super-class head V is nan (loss_super) and the loss of the sub-class heads W_s"),
    ],
)
def test_a_diverged_block_stops_there_and_saves_only_finite_states(
    real_data, class_labels: str, tmp_path: Path, lr: float, diverged: str
) -> None:
    train_dir = tmp_path / "train"
    with pytest.raises(TrainingInputError) as error:
        run_block(
            manifest=real_data.manifest,
            previous_checkpoint=real_data.checkpoint,
            labels=class_labels,
            method="deepercluster",
            round=1,
            train_dir=str(train_dir),
            out=str(train_dir / "checkpoint.pt"),
            **block_settings(epochs=2, batch_size=50, checkpoint_every=1, seed=7, lr=lr),
        )
    message = str(error.value)
    found = re.fullmatch(
        rf"round 1's training block diverged at iteration (\d+) \(epoch 0, batch \1\) with lr {lr}: (.*); lower "
        r"methods\.deepercluster\.lr and rerun, which trains the block afresh \(nothing non-finite was saved: "
        r"last\.pt holds the last finite state, if any\)",
        message,
    )
    assert found and found[2].startswith(diverged), message
    # last.pt (saved every iteration) is the state before the diverged one, finite, and so are its group files.
    assert not (train_dir / "checkpoint.pt").exists() and not (train_dir / "metrics.tsv").exists()
    saved = [train_dir / "last.pt", *train_dir.glob("last-group*.pt")]
    assert len(saved) == 2 and all(non_finite_weights(load_checkpoint(path)) == [] for path in saved)
    assert (load_checkpoint(train_dir / "last.pt")["batch"]) == int(found[1])
    losses = pd.read_csv(train_dir / "running-metrics.tsv", sep="\t")["loss"]
    assert len(losses) == int(found[1]) and np.isfinite(losses).all() and losses.max() > 100


@pytest.fixture
def diverged_checkpoint(real_data, tmp_path: Path) -> Path:
    """Round 1's checkpoint as a diverged block of lr 0.5 would have written it: a NaN in its first conv."""
    checkpoint = load_checkpoint(real_data.checkpoint)
    weight = next(name for name in checkpoint["model"] if name.endswith("weight") and "sobel" not in name)
    checkpoint["model"][weight][0] = float("nan")
    checkpoint |= {"round": 1, "provenance": {"method": "deepercluster", "lr": 0.5}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    return tmp_path / "checkpoint.pt"


@pytest.mark.parametrize("stage", ["features", "eval-probe-features", "export"])
def test_a_checkpoint_with_non_finite_weights_is_refused(
    real_data, diverged_checkpoint: Path, tmp_path: Path, stage: str
) -> None:
    out = tmp_path / "out"
    arguments = {
        "features": {"shard": 0, "shard_size": 200, "manifest": real_data.manifest, **shard_settings()},
        "eval-probe-features": {"manifest": real_data.manifest, **feature_settings()},
        "export": {"image_size": 32},
    }[stage]
    line = one_line_error(cli(stage, *shlex.split(options(checkpoint=diverged_checkpoint, out=out, **arguments))))
    assert re.search(
        rf"checkpoint {diverged_checkpoint} holds NaN or infinite values in model\.\S+: round 1's "
        "deepercluster training block made it with lr 0.5 and diverged: lower methods.deepercluster.lr "
        "and rerun snakemake",
        line,
    ), line
    assert not out.exists()


def with_nan_row(shard: str, row: int, out: Path) -> str:
    """A copy of ``shard`` whose row ``row`` is NaN."""
    shutil.copyfile(shard, out)
    with h5py.File(out, "r+") as f:
        f["features"][row] = np.nan
    return str(out)


def test_features_with_nan_rows_are_refused_by_pca_and_k_means(real_data, tmp_path: Path) -> None:
    shards = [real_data.shards[0], with_nan_row(real_data.shards[1], 7, tmp_path / "shard-1.h5"), real_data.shards[2]]
    line = one_line_error(
        cli(
            "pca",
            "--shards",
            *shards,
            "--checkpoint",
            real_data.checkpoint,
            "--out",
            str(tmp_path / "pca.h5"),
            *shlex.split(options(**pca_settings())),
        )
    )
    refused = (
        f"features file {shards[1]} holds non-finite values (1 of the 200 rows read, e.g. image id 207's): "
        f"{real_data.checkpoint} made them; that checkpoint's training diverged or overflows: lower the lr"
    )
    assert refused in line and not (tmp_path / "pca.h5").exists()
    # k-means, a level of the round's or the evaluations' flat one (faiss would give NaN rows cluster -1).
    with pytest.raises(ShardError, match=re.escape(refused)):
        cluster_super(
            shards=shards,
            pca=real_data.pca,
            out=str(tmp_path / "super.h5"),
            super_clusters=4,
            **kmeans_settings(iterations=2),
        )
    with pytest.raises(ShardError, match=re.escape(refused)):
        cluster_flat(
            features=shards[1], pca=real_data.pca, out=str(tmp_path / "flat.h5"), k=4, **kmeans_settings(iterations=2)
        )
    assert not (tmp_path / "super.h5").exists() and not (tmp_path / "flat.h5").exists()


def test_shards_of_another_checkpoint_are_refused(real_data, tmp_path: Path) -> None:
    """Every shard of the round replaced by those of another run's checkpoint (seed 1): pca and k-means refuse
    them, naming the checkpoint the round extracts with and the fix."""
    other = tmp_path / "seed-1.pt"
    initial_checkpoint(arch="small_convnet", sobel=True, seed=1, out=str(other))
    foreign = str(tmp_path / "features" / "shard-0.h5")
    extract_features(
        manifest=real_data.manifest,
        checkpoint=str(other),
        shard=0,
        shard_size=600,
        out=foreign,
        **shard_settings(image_size=32),
    )
    line = one_line_error(
        cli(
            "pca",
            "--shards",
            foreign,
            "--checkpoint",
            real_data.checkpoint,
            "--out",
            str(tmp_path / "pca.h5"),
            *shlex.split(options(**pca_settings())),
        )
    )
    assert f"feature shard {foreign} holds the features of another checkpoint (sha256 " in line
    assert f"than {real_data.checkpoint} (sha256 " in line and not (tmp_path / "pca.h5").exists()
    assert line.endswith(
        f"delete the shards of {tmp_path / 'features'} that are not of it and rerun snakemake, which re-extracts them"
    )
    with pytest.raises(
        ShardError,
        match=rf"feature shard {re.escape(foreign)} holds the features of another "
        rf"checkpoint .* than the checkpoint {re.escape(real_data.pca)} was fitted on",
    ):
        cluster_super(
            shards=[foreign],
            pca=real_data.pca,
            out=str(tmp_path / "super.h5"),
            super_clusters=4,
            **kmeans_settings(iterations=2),
        )
