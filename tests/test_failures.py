"""What a failure says and leaves behind: an input error inside a submitit job or a DataLoader worker is its one
line (no wrapper's traceback), a killed writer's partial file is removed by the next run, identical runs give
identical files, a run folder can be moved.

Each case is a small real run: ``python -m deepercluster``, or snakemake on the test config.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepercluster.files import sha256
from defaults import manifest_command
from test_bad_input import (
    cli,
    fill,
    one_line_error,
    small_disk,  # noqa: F401 (the fixture of a small tmpfs)
)
from test_workflow import snakemake

pytestmark = pytest.mark.usefixtures("single_process")

# Round 1 whole, and a shard of round 2: features of a trained checkpoint.
TARGETS = ["results/rounds/1/checkpoint.pt", "results/rounds/2/features/shard-0.h5"]
ROUND_1 = "results/rounds/1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two identical runs of the test config, in two folders, up to a shard of round 2."""
    folders = [tmp_path_factory.mktemp(name) for name in ("first", "second")]
    with ThreadPoolExecutor(2) as pool:
        for run in pool.map(lambda folder: snakemake(folder, *TARGETS), folders):
            assert run.returncode == 0, run.stderr[-3000:]
    return folders


def test_identical_runs_give_byte_identical_files(runs: list[Path]) -> None:
    first, second = runs
    patterns = ("checkpoint.pt", "features/*.h5", "clusters/*.h5", "pca.h5", "labels.parquet")
    rounds = [str(path.relative_to(first)) for p in patterns for path in (first / "results/rounds").glob(f"*/{p}")]
    made = ["results/data/manifest.parquet", *sorted(rounds)]
    assert len(made) == 11, made  # the manifest, 2 checkpoints, 3 shards, a pca, 3 clusters files, the labels
    assert {path: sha256(second / path) for path in made} == {path: sha256(first / path) for path in made}


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run elsewhere, to break."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def retrain_round_1(workdir: Path) -> tuple[str, str]:
    """Round 1's training block run again (its checkpoint deleted): (the rule's log, snakemake's output)."""
    (workdir / ROUND_1 / "checkpoint.pt").unlink()
    run = snakemake(workdir, f"{ROUND_1}/checkpoint.pt", "--show-failed-logs")
    assert run.returncode != 0
    return (workdir / "results/logs/rounds/1/checkpoint.log").read_text(), run.stdout + run.stderr


def assert_one_line(log: str, output: str, message: str) -> None:
    """``message`` in the rule's log and in snakemake's output, with no traceback in either."""
    assert message in log and "Traceback" not in log, log
    assert message in output and "Traceback" not in output, output[-5000:]


def test_an_image_corrupted_before_training_is_one_line(runs: list[Path], tmp_path: Path) -> None:
    workdir = copy_of(runs[0], tmp_path)
    shutil.rmtree(workdir / ROUND_1 / "train")  # a block that starts afresh and reads its images
    image = pd.read_parquet(workdir / "results/data/manifest.parquet")["path"].iloc[0]
    (workdir / image).write_bytes(b"not a png any more")
    log, output = retrain_round_1(workdir)
    assert_one_line(log, output, f"cannot read image {workdir / image} (UnidentifiedImageError")
    assert "fix the cause and rerun" not in log


def test_a_truncated_last_pt_says_to_delete_it(runs: list[Path], tmp_path: Path) -> None:
    workdir = copy_of(runs[0], tmp_path)
    last = workdir / ROUND_1 / "train/last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    log, output = retrain_round_1(workdir)
    message = f"checkpoint {ROUND_1}/train/last.pt is unreadable"
    assert_one_line(log, output, message)
    assert "not a PyTorch file: delete it and rerun" in log and "the block resumes from" not in log


def test_a_full_disk_while_saving_last_pt_is_one_line(
    runs: list[Path],
    tmp_path: Path,
    small_disk: Path,  # noqa: F811 (the fixture)
) -> None:
    workdir = copy_of(runs[0], tmp_path)
    train = workdir / ROUND_1 / "train"
    shutil.rmtree(train)
    train.symlink_to(small_disk)  # the block's folder (its submitit files, last.pt) on the small disk
    fill(small_disk, 2 << 20)  # less than last.pt of the test config (5.5 MB)
    log, output = retrain_round_1(workdir)
    assert_one_line(log, output, f"no space left on the disk of {ROUND_1}/train/")
    assert not list(small_disk.glob("*.partial"))


def test_an_output_folder_that_may_not_be_written_is_named(runs: list[Path], tmp_path: Path) -> None:
    workdir = copy_of(runs[0], tmp_path)
    features = workdir / ROUND_1 / "features"
    (features / "shard-0.h5").unlink()
    if subprocess.run(["chattr", "+i", str(features)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        run = snakemake(workdir, f"{ROUND_1}/features/shard-0.h5", "--show-failed-logs")
    finally:
        subprocess.run(["chattr", "-i", str(features)], check=True)
    assert run.returncode != 0
    log = (workdir / "results/logs/rounds/1/features/shard-0.log").read_text()
    message = f"cannot write {ROUND_1}/features/shard-0.h5: the folder {ROUND_1}/features is not writable"
    assert_one_line(log, run.stdout + run.stderr, message)


def unlabelled_manifest(source: str, path: str, manifest: str, skipped: str) -> list[str]:
    """The manifest stage's command for every image of ``path`` (a ``source``), no labels, paths relative to the
    working directory."""
    return manifest_command(
        source=source,
        path=path,
        manifest=manifest,
        skipped=skipped,
        label_from_folder=False,
        max_images=None,
        split=None,
    )


def small_folder_run(run: Path, images: int = 6) -> Path:
    """``run`` with a few real images under it (images/), their manifest built there, a round-0 checkpoint."""
    folder = run / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for stage in (
        unlabelled_manifest("folder", "images", "manifest.parquet", "skipped.tsv"),
        ["init", "--arch", "small_convnet", "--sobel", "--seed", "0", "--out", "checkpoint.pt"],
    ):
        done = cli(*stage, cwd=run)
        assert done.returncode == 0, done.stderr
    return run


def features(run: Path, workers: int = 0) -> subprocess.CompletedProcess:
    """The features stage on every image of ``run``'s manifest, in ``run``."""
    return cli(
        "features",
        "--manifest",
        "manifest.parquet",
        "--checkpoint",
        "checkpoint.pt",
        "--shard",
        "0",
        "--shard-size",
        "100",
        "--image-size",
        "32",
        "--out",
        "shard.h5",
        "--batch-size",
        "4",
        "--workers",
        str(workers),
        "--dtype",
        "float32",
        cwd=run,
    )


def test_an_image_deleted_after_the_manifest_is_one_line_from_a_dataloader_worker(tmp_path: Path) -> None:
    run = small_folder_run(tmp_path / "run")
    (run / "images/3.png").unlink()
    line = one_line_error(features(run, workers=1))
    assert line.endswith(
        f"cannot read image {run / 'images/3.png'} (FileNotFoundError: [Errno 2] No such file or directory: "
        f"'{run / 'images/3.png'}'); the image was readable when results/data/manifest.parquet was built; restore "
        "it, or delete the manifest and rerun to skip it"
    ), line
    assert "DataLoader worker" not in line


def test_a_moved_run_folder_reads_its_own_images(tmp_path: Path) -> None:
    run = small_folder_run(tmp_path / "run")
    stored = pd.read_parquet(run / "manifest.parquet")["path"].tolist()
    assert stored == [f"images/{i}.png" for i in range(6)]  # under the working directory: relative to it
    moved = tmp_path / "scratch" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    done = features(moved)
    assert done.returncode == 0, done.stderr
    outside = tmp_path / "outside.png"  # an image elsewhere keeps its absolute path
    shutil.copy(moved / "images/0.png", outside)
    pd.DataFrame({"path": [str(outside), "images/1.png"]}).to_csv(moved / "table.csv", index=False)
    table = unlabelled_manifest("table", "table.csv", "table.parquet", "s.tsv")
    done = cli(*table, cwd=moved)
    assert done.returncode == 0, done.stderr
    assert pd.read_parquet(moved / "table.parquet")["path"].tolist() == [str(outside), "images/1.png"]


KILLED_MID_WRITE = """
import os, signal, sys
from deepercluster.files import atomic_output
with atomic_output(sys.argv[1]) as partial:
    partial.write_bytes(b"the first half of a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_rerun_of_a_stage_killed_mid_write_removes_its_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint.pt"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".checkpoint.pt.*.partial")
    dead_pid = stale.name.split(".")[-2]
    others = [tmp_path / f".shard-0.h5.{dead_pid}.partial", tmp_path / ".checkpoint.pt.1.partial"]
    for other in others:  # another output's, and a writer's that still runs (pid 1): not this run's to remove
        other.write_bytes(b"")
    done = cli("init", "--arch", "small_convnet", "--sobel", "--seed", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not stale.exists()
    assert all(other.exists() for other in others)


def test_a_registered_checkpoint_that_is_not_a_torch_file_says_to_check_it(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "ext.pt"
    line = one_line_error(cli("import-checkpoint", "--source", str(garbage), "--out", str(out), "--sobel"))
    assert f"checkpoint {garbage} is unreadable" in line and "not a PyTorch file" in line
    assert "check its path under checkpoints: in the config, or the file itself" in line
    assert "rerun the stage that makes it" not in line
