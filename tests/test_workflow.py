"""The workflow for real: snakemake on .test/config.yaml (300 Fashion-MNIST images, 2 shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / ".test" / "config.yaml"
ROUND = Path("results/rounds/1")
ROUND_1_OUTPUTS = [
    "results/data/manifest.parquet",
    "results/data/skipped.tsv",
    "results/rounds/0/checkpoint.pt",
    *[f"{ROUND}/features/shard-{i}.h5" for i in range(2)],
    f"{ROUND}/pca.h5",
    f"{ROUND}/clusters/super.h5",
    *[f"{ROUND}/clusters/sub-{s}.h5" for s in range(2)],
    f"{ROUND}/labels.parquet",
    f"{ROUND}/cluster_sizes.tsv",
    f"{ROUND}/nmi.json",
]


def snakemake(workdir: Path, *args: str, configfile: Path = TEST_CONFIG) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir``, with this interpreter's environment on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
    command += ["--configfile", str(configfile)]
    return subprocess.run(
        [*command, "--cores", "2", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )


def modification_times(workdir: Path) -> dict[str, int]:
    return {path: (workdir / path).stat().st_mtime_ns for path in ROUND_1_OUTPUTS}


@pytest.fixture(scope="module")
def round_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    run = snakemake(workdir, "results/rounds/1/labels.parquet")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def test_round_1_produces_every_stage_file(round_1: Path) -> None:
    for path in ROUND_1_OUTPUTS:
        assert (round_1 / path).is_file(), path
    manifest = pd.read_parquet(round_1 / "results/data/manifest.parquet")
    assert len(manifest) == 300 and manifest["id"].tolist() == list(range(300))

    shard_ids = []
    for i in range(2):
        with h5py.File(round_1 / ROUND / f"features/shard-{i}.h5") as f:
            assert f["features"].shape == (150, 256) and f["features"].dtype == np.float32
            shard_ids.append(f["ids"][:])
    assert sorted(np.concatenate(shard_ids).tolist()) == list(range(300))

    labels = pd.read_parquet(round_1 / ROUND / "labels.parquet")
    assert labels["id"].tolist() == list(range(300))
    assert set(labels["super_cluster"]) == {0, 1} and labels["sub_cluster"].between(0, 3).all()
    sizes = pd.read_csv(round_1 / ROUND / "cluster_sizes.tsv", sep="\t")
    assert len(sizes) == 8 and (sizes["size"] > 0).all() and sizes["size"].sum() == 300

    nmi = json.loads((round_1 / ROUND / "nmi.json").read_text())
    assert set(nmi) == {"label", "split", "previous_round"} and nmi["previous_round"] is None
    assert 0.0 < nmi["label"] < 1.0


def test_every_long_stage_logs_progress(round_1: Path) -> None:
    logs = round_1 / "results/logs"
    assert "verify images" in (logs / "data/manifest.log").read_text()
    assert "features shard 0" in (logs / "rounds/1/features/shard-0.log").read_text()
    assert "pca sample" in (logs / "rounds/1/pca.log").read_text()
    assert "iteration 5/5" in (logs / "rounds/1/clusters/super.log").read_text()
    assert (round_1 / "results/benchmarks/rounds/1/clusters/super.tsv").is_file()


@pytest.mark.parametrize(
    ("deleted", "rerun"),
    [
        (f"{ROUND}/clusters/sub-1.h5", {f"{ROUND}/clusters/sub-1.h5", f"{ROUND}/labels.parquet"}),
        (
            f"{ROUND}/features/shard-1.h5",
            {f"{ROUND}/features/shard-1.h5", f"{ROUND}/pca.h5", f"{ROUND}/clusters/super.h5"}
            | {f"{ROUND}/clusters/sub-{s}.h5" for s in range(2)}
            | {f"{ROUND}/labels.parquet"},
        ),
    ],
)
def test_deleting_an_output_reruns_only_it_and_its_dependents(
    round_1: Path, deleted: str, rerun: set[str]
) -> None:
    before = modification_times(round_1)
    (round_1 / deleted).unlink()
    run = snakemake(round_1)
    assert run.returncode == 0, run.stderr[-3000:]
    after = modification_times(round_1)
    changed = {path for path in ROUND_1_OUTPUTS if after[path] != before[path]}
    assert rerun <= changed
    assert changed <= rerun | {f"{ROUND}/cluster_sizes.tsv", f"{ROUND}/nmi.json"}


def test_an_unknown_config_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(TEST_CONFIG.read_text() + "  superclusters: 4\n")  # a typo inside kmeans:
    run = snakemake(tmp_path, "-n", configfile=config)
    assert run.returncode != 0
    assert "superclusters" in run.stderr + run.stdout
