"""`snakemake compare`: random init, RotNet, DeepCluster and DeeperCluster trained with one config in one DAG,
evaluated and put side by side, on a really tiny real run of Fashion-MNIST images."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_evaluate import snakemake

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINED = {"rotnet": "results/compare/rotnet", "deepcluster": "results/compare/deepcluster", "deepercluster": "results"}


def tiny_config(method: str = "deepercluster") -> dict:
    """80 images in one shard, 1 round of 1 epoch, trained in the stage's own process; 100 evaluation images."""
    return {
        **yaml.safe_load((REPO / ".test" / "config.yaml").read_text()),
        "method": method,
        "rounds": 1,
        "launcher": "debug",
        "data": {"max_images": 80, "image_size": 32, "workers": 0},
        "features": {"shard_size": 80, "batch_size": 80},
        "kmeans": {"super_clusters": 2, "sub_clusters": 3, "iterations": 3},
        "evaluation": {"data": {"max_images": 100}, "clusters": 4, "nmi_seeds": 2, "probe_iterations": 50},
    }


def planned_outputs(run: subprocess.CompletedProcess) -> dict[str, set[str]]:
    """The outputs of each rule's jobs in a dry run's plan."""
    jobs: dict[str, set[str]] = {}
    for rule, outputs in re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: (.*)$", run.stdout, re.MULTILINE):
        jobs.setdefault(rule, set()).update(outputs.split(", "))
    return jobs


@pytest.mark.parametrize("method", ["deepercluster", "rotnet"])
def test_compare_plans_every_method_and_the_default_target_none(method: str, tmp_path: Path) -> None:
    trained = {**TRAINED, "deepercluster": "results/compare/deepercluster", method: "results"}
    # With the manifest made, a dry run plans every job of every round (the shards are known).
    manifest = snakemake(tmp_path, tiny_config(method), "results/data/manifest.parquet")
    assert manifest.returncode == 0, manifest.stderr[-3000:]
    run = snakemake(tmp_path, tiny_config(method), "-n", "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_outputs(run)
    # One training block per method: the config's method is the main run, the others runs of their own.
    assert jobs["train"] == {f"{folder}/rounds/1/{file}" for folder in trained.values()
                             for file in ("checkpoint.pt", "train/metrics.tsv")}  # fmt: skip
    assert jobs["initial_checkpoint"] == {"results/rounds/0/checkpoint.pt"}
    # Each of the four rows evaluated: round 0 (random init) and each method's last round.
    rows = ["results/evals/round-0", *(f"{folder}/evals/round-1" for folder in trained.values())]
    assert jobs["eval_linear"] == {f"{row}/{file}" for row in rows for file in ("linear.json", "linear.png")}
    assert jobs["eval_knn"] == {f"{row}/knn.json" for row in rows}
    assert jobs["compare_table"] == {f"results/compare/{file}" for file in ("table.md", "table.tsv", "linear.png")}
    # Of the main layout's rounds, only the main run's own files (those the default target makes): the
    # other methods' files are all under results/compare/, which the default target leaves alone.
    everything = snakemake(tmp_path, tiny_config(method), "-n")
    assert everything.returncode == 0 and "results/compare/" not in everything.stdout + everything.stderr
    main_run = {path for outputs in planned_outputs(everything).values() for path in outputs}
    main_rounds = {path for outputs in jobs.values() for path in outputs if path.startswith("results/rounds/")}
    assert "results/rounds/1/checkpoint.pt" in main_rounds and main_rounds <= main_run
    for folder in trained.values():  # each clustering method's own feature shards
        assert (f"{folder}/rounds/1/features/shard-0.h5" in jobs.get("features", set())) == (
            folder != trained["rotnet"]
        )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A real `snakemake compare` of the tiny config, and its wall time."""
    workdir = tmp_path_factory.mktemp("compare")
    start = time.monotonic()
    run = snakemake(workdir, tiny_config(), "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, time.monotonic() - start


def test_compare_trains_evaluates_and_tabulates_four_methods(compared: tuple[Path, float]) -> None:
    workdir, seconds = compared
    print(f"snakemake compare on the tiny config: {seconds:.0f} s")
    folders = {"random": "results/evals/round-0", **{m: f"{run}/evals/round-1" for m, run in TRAINED.items()}}
    table = (workdir / "results/compare/table.md").read_text().splitlines()
    assert table[0].startswith("| method | checkpoint | linear conv1 | linear conv2 | linear conv3 | 20-NN | NMI label")
    assert [line.split(" | ")[:2] for line in table[2:6]] == [
        ["| random", "`results/rounds/0/checkpoint.pt`"],
        *([f"| {m}", f"`{run}/rounds/1/checkpoint.pt`"] for m, run in TRAINED.items()),
    ]
    numbers = pd.read_csv(workdir / "results/compare/table.tsv", sep="\t", index_col="method")
    assert list(numbers.index) == list(folders)
    for method, folder in folders.items():
        knn = json.loads((workdir / folder / "knn.json").read_text())
        nmi = json.loads((workdir / folder / "nmi.json").read_text())
        linear = json.loads((workdir / folder / "linear.json").read_text())
        row = numbers.loc[method]
        assert (row["knn"], row["knn_low"], row["knn_high"]) == (knn["top1"], *knn["ci95"])
        assert (row["nmi_label"], row["nmi_label_sd"]) == (nmi["nmi"]["label"], nmi["nmi_sd"]["label"])
        for layer in linear["layers"]:
            column = f"linear_{layer['layer']}"
            assert row[f"{column}_low"] <= row[column] == layer["top1"] <= row[f"{column}_high"]
            assert f" {100 * layer['top1']:.1f} [" in table[2 + list(folders).index(method)]
    # The trained methods differ from the random init and from each other: each row is its own checkpoint.
    assert numbers["knn"].nunique() > 1 or numbers["linear_conv3"].nunique() > 1
    assert (workdir / "results/compare/linear.png").read_bytes().startswith(PNG_MAGIC)


def test_a_deleted_checkpoint_reruns_only_its_method_and_the_table(compared: tuple[Path, float]) -> None:
    workdir, _ = compared
    results = workdir / "results"
    before = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    (results / "compare/rotnet/rounds/1/checkpoint.pt").unlink()
    run = snakemake(workdir, yaml.safe_load((workdir / "config.yaml").read_text()), "compare")
    assert run.returncode == 0, run.stderr[-3000:]
    after = {path: path.stat().st_mtime_ns for path in results.rglob("*") if path.is_file()}
    changed = {str(path.relative_to(workdir)) for path in before if after.get(path) != before[path]}
    rotnet = "results/compare/rotnet"
    # RotNet's block, its evaluations and the table reran; nothing of the other runs nor of round 0.
    assert {
        f"{rotnet}/rounds/1/checkpoint.pt", f"{rotnet}/rounds/1/train/metrics.tsv",
        *(f"{rotnet}/evals/round-1/{file}" for file in ("features.h5", "pca.h5", "probe_features.h5", "linear.json",
                                                       "linear.png", "knn.json", "nmi.json", "nmi.png")),
        *(f"results/compare/{file}" for file in ("table.md", "table.tsv", "linear.png")),
    } <= changed  # fmt: skip
    compared_files = ("results/compare/table.", "results/compare/linear.png", "results/logs/compare/",
                      "results/benchmarks/compare/")  # fmt: skip
    assert all(path.startswith((f"{rotnet}/", *compared_files)) for path in changed), sorted(changed)
