"""`snakemake compare`: random init, RotNet, DeepCluster, DeeperCluster (from the RotNet) and the supervised bound
trained with one config in one DAG, evaluated and put side by side, on a really tiny real run of Fashion-MNIST
images."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from deepercluster.checkpoints import load_checkpoint
from deepercluster.files import sha256
from test_evaluate import snakemake

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("rotnet", "deepcluster", "deepercluster", "supervised")


def trained(method: str) -> dict[str, str]:
    """Each method's run when ``method`` is the main run's."""
    return {m: "results" if m == method else f"results/{m}" for m in METHODS}


def tiny_config(method: str = "deepercluster") -> dict:
    """80 images in one shard, 1 round of 1 epoch for each method, DeeperCluster from the RotNet, trained in the
    stage's own process; 100 test images."""
    one_round = {"rounds": 1, "epochs_per_round": 1}
    return {
        **yaml.safe_load((REPO / ".test" / "config.yaml").read_text()),
        "method": method,
        "launcher": "debug",
        "data": {"max_images": 80, "image_size": 32, "workers": 0},
        "features": {"shard_size": 80, "batch_size": 80},
        "kmeans": {"iterations": 3},
        "methods": {
            "deepercluster": {**one_round, "init": "rotnet", "super_clusters": 2, "sub_clusters": 3},
            "deepcluster": {**one_round, "clusters": 3},
            "rotnet": one_round,
            "supervised": one_round,
        },
        "evaluation": {
            "data": {"max_images": 100},
            "clusters": 4,
            "nmi_seeds": 2,
            "probe_iterations": 50,
            "similarity_images": 20,
        },
    }


def planned_outputs(run: subprocess.CompletedProcess) -> dict[str, set[str]]:
    """The outputs of each rule's jobs in a dry run's plan."""
    jobs: dict[str, set[str]] = {}
    for rule, outputs in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: (.*)$", run.stdout, re.MULTILINE):
        jobs.setdefault(rule, set()).update(outputs.split(", "))
    return jobs


@pytest.mark.parametrize("method", ["deepercluster", "rotnet"])
def test_compare_plans_every_method_and_the_default_target_only_what_the_main_run_needs(
    method: str, tmp_path: Path
) -> None:
    runs = trained(method)
    # With the manifest made, a dry run plans every job of every round (the shards are known).
    manifest = snakemake(tmp_path, tiny_config(method), "results/data/manifest.parquet")
    assert manifest.returncode == 0, manifest.stderr[-3000:]
    run = snakemake(tmp_path, tiny_config(method), "-n", "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_outputs(run)
    # One training block per method: the config's method is the main run, the others runs of their own.
    assert jobs["train"] == {
        f"{folder}/rounds/1/{file}" for folder in runs.values() for file in ("checkpoint.pt", "train/metrics.tsv")
    }
    assert jobs["initial_checkpoint"] == {"results/rounds/0/checkpoint.pt"}
    assert jobs["true_labels"] == {f"{runs['supervised']}/true_labels.parquet"}
    # Each of the five rows evaluated: round 0 (random init) and each method's last round; each run's change.
    rows = ["results/evals/round-0", *(f"{folder}/evals/round-1" for folder in runs.values())]
    assert jobs["eval_linear"] == {f"{row}/{file}" for row in rows for file in ("linear.json", "linear.png")}
    assert jobs["eval_knn"] == {f"{row}/knn.json" for row in rows}
    assert jobs["eval_similarity"] == {
        f"{folder}/evals/similarity.{ext}" for folder in runs.values() for ext in ("tsv", "png")
    }
    assert jobs["compare_table"] == {f"results/compare/{file}" for file in ("table.md", "table.tsv", "linear.png")}
    # The default target: the main run's files, and for DeeperCluster the RotNet run it starts from, nothing else.
    everything = snakemake(tmp_path, tiny_config(method), "-n")
    assert everything.returncode == 0
    main_run = planned_outputs(everything)
    other_runs = tuple(f"results/{m}/" for m in METHODS)
    needed = (f"{runs['rotnet']}/rounds/",) if method == "deepercluster" else ()
    outputs = {path for paths in main_run.values() for path in paths}
    assert all(not path.startswith(other_runs) or path.startswith(needed) for path in outputs), sorted(outputs)
    assert "eval_linear" not in main_run and "compare_table" not in main_run


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A real `snakemake compare` of the tiny config, and its wall time."""
    workdir = tmp_path_factory.mktemp("compare")
    start = time.monotonic()
    run = snakemake(workdir, tiny_config(), "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, time.monotonic() - start


def test_compare_trains_evaluates_and_tabulates_every_method_and_the_bound(compared: tuple[Path, float]) -> None:
    workdir, seconds = compared
    print(f"snakemake compare on the tiny config: {seconds:.0f} s")
    runs = trained("deepercluster")
    folders = {"random": "results/evals/round-0", **{m: f"{run}/evals/round-1" for m, run in runs.items()}}
    table = (workdir / "results/compare/table.md").read_text().splitlines()
    assert table[0].startswith("| method | checkpoint | linear conv1 (channels) | linear conv2 (channels) |")
    assert "linear conv3 (pooled) |" in table[0]
    assert [line.split(" | ")[:2] for line in table[2:7]] == [
        ["| random", "`results/rounds/0/checkpoint.pt`"],
        *([f"| {m}", f"`{run}/rounds/1/checkpoint.pt`"] for m, run in runs.items()),
    ]
    numbers = pd.read_csv(workdir / "results/compare/table.tsv", sep="\t", index_col="method")
    assert list(numbers.index) == list(folders)
    for method, folder in folders.items():
        knn = json.loads((workdir / folder / "knn.json").read_text())
        nmi = json.loads((workdir / folder / "nmi.json").read_text())
        linear = json.loads((workdir / folder / "linear.json").read_text())
        row = numbers.loc[method]
        assert [(layer["layer"], layer["pooling"]) for layer in knn["layers"]] == [
            ("penultimate", "feature"),
            ("conv1", "channels"),
            ("conv2", "channels"),
            ("conv3", "channels"),
        ]
        for layer in knn["layers"]:
            column = f"knn_{layer['pooling']}_{layer['layer']}"
            assert (row[column], row[f"{column}_low"], row[f"{column}_high"]) == (layer["top1"], *layer["ci95"])
        assert (row["nmi_label"], row["nmi_label_sd"]) == (nmi["nmi"]["label"], nmi["nmi_sd"]["label"])
        assert (linear["train_images"], linear["test_images"]) == (80, 100)  # trained on the training images
        assert {layer["pooling"] for layer in linear["layers"]} == {"channels", "pooled"}
        for layer in linear["layers"]:
            column = f"linear_{layer['pooling']}_{layer['layer']}"
            assert row[f"{column}_low"] <= row[column] == layer["top1"] <= row[f"{column}_high"]
            assert f" {100 * layer['top1']:.1f} [" in table[2 + list(folders).index(method)]
    # The trained methods differ from the random init and from each other: each row is its own checkpoint.
    assert numbers["knn_feature_penultimate"].nunique() > 1 or numbers["linear_channels_conv3"].nunique() > 1
    assert (workdir / "results/compare/linear.png").read_bytes().startswith(PNG_MAGIC)
    # DeeperCluster's round 0 is the RotNet row's checkpoint, to the byte.
    rotnet = workdir / runs["rotnet"] / "rounds/1/checkpoint.pt"
    block = load_checkpoint(workdir / runs["deepercluster"] / "rounds/1/checkpoint.pt")["provenance"]
    assert block["previous_sha256"] == sha256(rotnet)
    with h5py.File(workdir / runs["deepercluster"] / "rounds/1/features/shard-0.h5") as f:
        assert f.attrs["checkpoint_sha256"] == sha256(rotnet)
    # Each run's change from its round 0, per conv layer: round 0 against itself is 1.
    similarity = pd.read_csv(workdir / runs["deepercluster"] / "evals/similarity.tsv", sep="\t")
    assert similarity["round"].tolist() == [0, 0, 0, 1, 1, 1]
    assert np.allclose(similarity.loc[similarity["round"] == 0, ["weight_cosine", "cka"]], 1)
    after = similarity[similarity["round"] == 1]
    assert (after["cka"] < 1).all() and (after["weight_cosine"] <= 1).all()  # 2 steps: the weights barely move


def test_a_deleted_checkpoint_reruns_only_its_method_and_the_table(compared: tuple[Path, float]) -> None:
    workdir, _ = compared
    results = workdir / "results"
    before = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    (results / "rotnet/rounds/1/checkpoint.pt").unlink()
    run = snakemake(workdir, yaml.safe_load((workdir / "config.yaml").read_text()), "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    after = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    changed = {str(path.relative_to(workdir)) for path in before if after.get(path) != before[path]}
    rotnet = "results/rotnet"
    # RotNet's block, its evaluations, the DeeperCluster run that starts from it (the main run) and the table
    # reran; nothing of DeepCluster's or the supervised run, nor of round 0.
    assert {
        f"{rotnet}/rounds/1/checkpoint.pt",
        f"{rotnet}/rounds/1/train/metrics.tsv",
        *(
            f"{rotnet}/evals/round-1/{file}"
            for file in (
                "features.h5",
                "pca.h5",
                "probe_features.h5",
                "linear.json",
                "linear.png",
                "knn.json",
                "nmi.json",
                "nmi.png",
            )
        ),
        "results/rounds/1/features/shard-0.h5",
        "results/rounds/1/checkpoint.pt",
        *(f"results/compare/{file}" for file in ("table.md", "table.tsv", "linear.png")),
    } <= changed
    untouched = ("results/deepcluster/", "results/supervised/", "results/rounds/0/", "results/evals/round-0/")
    assert not [path for path in changed if path.startswith(untouched)]
