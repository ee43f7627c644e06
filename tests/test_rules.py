"""The rules' options round-trip: every `python -m deepercluster` command the workflow plans parses back,
through the package's own parser, into its stage function's keyword arguments with the config's values.

A dry run (`snakemake -n -p`) plans every rule: the manifest in an empty folder, then, once a manifest
exists, every round of the three methods (the comparison), the evaluations of a round and of a registered
checkpoint, VOC07, retrieval and an export. Each printed command is read by the CLI's own
``deepercluster.__main__.parse_command`` and bound to the stage's function; the values that come out are
compared with the config's, once for the schema's defaults and once for a config whose every value
differs from them (so a value that does not reach its stage shows as the stage's default).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deepercluster.__main__ import Command, parse_command
from deepercluster.config import validate_config
from deepercluster.errors import ConfigError
from deepercluster.resources import allocation, require_array_fits
from deepercluster.seeds import derived_seed
from deepercluster.stages import STAGES, stage_options
from deepercluster.train.settings import Allocation, BlockSettings

REPO = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")

# Values that differ from every default of the schema.
CHANGED = {
    "method": "deepercluster",
    "launcher": "slurm",
    "seed": 7,
    "methods": {
        "deepercluster": {
            "init": "mine",
            "rounds": 2,
            "epochs_per_round": 2,
            "lr": 0.031,
            "head_momentum": 0.7,
            "super_clusters": 3,
            "sub_clusters": 5,
            "pca_fraction": 0.5,
        },
        "deepcluster": {
            "init": "rotnet",
            "rounds": 3,
            "epochs_per_round": 2,
            "lr": 0.02,
            "head_momentum": 0.1,
            "clusters": 7,
            "pca_fraction": 0.25,
        },
        "rotnet": {"init": "mine", "rounds": 2, "epochs_per_round": 1, "lr": 0.04, "head_momentum": 0.6},
        "supervised": {
            "init": "rotnet",
            "rounds": 1,
            "epochs_per_round": 4,
            "lr": 0.03,
            "head_momentum": 0.5,
            "label_column": "kind",
        },
    },
    "data": {
        "source": "folder",
        "path": "images",
        "path_column": "file",
        "label_from_folder": False,
        "split": None,
        "max_images": 250,
        "uncurated": {"tail_ratio": 20, "duplicate_share": 0.05, "distractor_share": 0.2},
        "verify_images": "none",
        "image_size": 40,
        "workers": 1,
    },
    "model": {"arch": "vgg16_bn", "sobel": False},
    "features": {"shard_size": 100, "batch_size": 50},
    "pca": {"sample_size": 900, "eigenvalue_floor": 0.0001},
    "kmeans": {"iterations": 7, "cache_mb": 512, "dtype": "float32"},
    "train": {
        "batch_size": 48,
        "momentum": 0.8,
        "weight_decay": 0.0002,
        "checkpoint_every": 9,
        "dropout": 0.3,
    },
    "resources": {
        "default": {"cpus_per_task": 3},
        "super_clusters": {"tasks": 2},
        "train": {
            "tasks": 4,
            "nodes": 2,
            "gpus": 2,
            "gpu_model": "a100",
            "mem_mb": 8000,
            "runtime": 30,
            "slurm_partition": "gpu",
            "slurm_account": "lab",
        },
    },
    "evaluation": {
        "train_data": {
            "source": "folder",
            "path": "labelled",
            "path_column": "picture",
            "label_from_folder": False,
            "split": "train2",
            "max_images": 90,
        },
        "data": {
            "source": "table",
            "path": "eval.csv",
            "path_column": "image",
            "label_from_folder": False,
            "split": "val",
            "max_images": 120,
        },
        "label_column": "class",
        "similarity_images": 30,
        "batch_size": 32,
        "probe_weight_decays": [0.01, 0.1],
        "probe_iterations": 50,
        "weight_decay": 0.001,
        "knn_k": 7,
        "clusters": 6,
        "nmi_seeds": 2,
        "pca_dim": 12,
        "clusters_shown": 4,
        "voc07_epochs": 3,
        "voc07_lr": 0.02,
        "retrieval_dim": 8,
    },
    "curation": {"size": 120, "strategy": "nearest", "duplicate_similarity": 0.9, "clusters": "round-1"},
}
# What every config adds so that every rule is planned: VOC07, retrieval and a registered checkpoint.
EVERY_RULE = {
    "evaluation": {"voc07": "voc", "retrieval": "retrieval.csv"},
    "checkpoints": {"mine": {"path": "mine.pt", "arch": "small_convnet", "sobel": False}},
}


def merged(config: dict, extra: dict) -> dict:
    """``config`` with ``extra``'s keys set, one level deep."""
    out = copy.deepcopy(config)
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def package_rules() -> set[str]:
    """The rules whose shell command runs a stage of the package."""
    text = "\n".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    blocks = re.split(r"^(?=(?:rule|checkpoint) )", text, flags=re.M)
    return {HEADER.match(block.splitlines()[0]).group(1) for block in blocks[1:] if "python -m deepercluster" in block}


def dry_run(workdir: Path, config: dict, *targets: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job `snakemake -n -p` plans for ``targets`` in ``workdir``."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml"]
    run = subprocess.run(
        [*command, "-n", "-p", "--cores", "2", *targets],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    jobs, rule = [], None
    for line in run.stdout.splitlines():
        if header := HEADER.match(line):
            rule = header.group(1)
        elif line.startswith("Shell command: ") and line != "Shell command: None":
            jobs.append((rule, line.removeprefix("Shell command: ")))
    return jobs


def stage_call(command: str) -> Command:
    """A `python -m deepercluster` command as the package's CLI reads it: its stage, the keyword arguments its
    function is called with (each one a parameter of the function, or of the function it forwards to), ranks."""
    words = shlex.split(command)
    words = words[: words.index(">")] if ">" in words else words
    assert words[:3] == ["python", "-m", "deepercluster"], command
    try:
        call = parse_command(words[3:])
    except SystemExit:
        pytest.fail(f"the stage's parser rejects: {command}")
    function, *forwarded = stage_options(call.stage)
    own = {name for name, p in inspect.signature(function).parameters.items() if p.kind is not p.VAR_KEYWORD}
    inspect.signature(function).bind(**{name: call.arguments[name] for name in own})
    rest = {name: value for name, value in call.arguments.items() if name not in own}
    for other in forwarded:
        inspect.signature(other).bind_partial(**rest)
    assert forwarded or not rest, (command, rest)
    return call


def expected(rule: str, config: dict, arguments: dict) -> dict:
    """The values of ``config`` that ``rule``'s command must pass its stage, by keyword."""
    data, evaluation, kmeans, pca = config["data"], config["evaluation"], config["kmeans"], config["pca"]
    found = re.match(r"^(.*)/rounds/(\d+)/", arguments.get("out") or "")  # {run}/rounds/{r}/...
    run, r = (found[1], int(found[2])) if found else (None, None)
    round_seed = derived_seed(config["seed"], r) if found else None
    others = [m for m in ("deepercluster", "deepcluster", "rotnet", "supervised") if m != config["method"]]
    methods = {"results": config["method"]} | {f"results/{m}": m for m in others}
    method = config["methods"].get(methods.get(run), {})
    train = allocation(config["resources"], "train")
    image = {"image_size": data["image_size"], "workers": data["workers"]}
    return {
        "manifest": {
            "seed": config["seed"],
            **{
                key: data[key]
                for key in (
                    "source",
                    "path",
                    "path_column",
                    "label_from_folder",
                    "split",
                    "max_images",
                    "uncurated",
                    "verify_images",
                    "workers",
                )
            },
        },
        "initial_checkpoint": {"seed": config["seed"], **config["model"]},
        "features": {
            **image,
            "shard_size": config["features"]["shard_size"],
            "batch_size": config["features"]["batch_size"],
        },
        "pca": {
            "seed": round_seed,
            "dim": None,
            "fraction": method.get("pca_fraction"),
            **{key: pca[key] for key in ("sample_size", "eigenvalue_floor")},
        },
        "super_clusters": {"seed": round_seed, **kmeans, "super_clusters": method.get("super_clusters", 1)},
        "sub_clusters": {
            "seed": round_seed,
            "sub_clusters": method.get("sub_clusters", method.get("clusters")),
            **kmeans,
        },
        "train": {
            "workers": data["workers"],
            "round": r,
            "method": methods.get(run),
            "launcher": config["launcher"],
            "checkpoint_every": config["train"]["checkpoint_every"],
            "settings": BlockSettings(
                epochs=method.get("epochs_per_round"),
                lr=method.get("lr"),
                head_momentum=method.get("head_momentum"),
                image_size=data["image_size"],
                seed=round_seed,
                **{
                    key: config["train"][key]
                    for key in ("batch_size", "momentum", "weight_decay", "dropout", "min_crop_scale")
                },
            ),
            "allocation": Allocation(
                tasks=train["tasks"],
                nodes=train["nodes"],
                gpus_per_node=train["gpus"],
                gpu_model=train["gpu_model"],
                cpus_per_task=train["cpus_per_task"],
                mem_mb=train["mem_mb"],
                timeout_min=train["runtime"],
                slurm_partition=train["slurm_partition"],
                slurm_account=train["slurm_account"],
            ),
        },
        "round_figures": {"seed": config["seed"], "shown": evaluation["clusters_shown"]},
        "eval_images": {
            "seed": config["seed"],
            "verify_images": data["verify_images"],
            "workers": data["workers"],
            **evaluation["train_data" if "/train.parquet" in arguments.get("manifest", "") else "data"],
        },
        "import_checkpoint": {"arch": "small_convnet", "sobel": False},
        "eval_features": {**image, "batch_size": config["features"]["batch_size"]},
        "eval_pca": {
            "seed": config["seed"],
            "dim": evaluation["pca_dim"],
            "fraction": 1.0,
            "sample_size": pca["sample_size"],
            "eigenvalue_floor": pca["eigenvalue_floor"],
        },
        "eval_kmeans": {"seed": config["seed"], "k": evaluation["clusters"], **kmeans},
        "eval_probe_features": {**image, "batch_size": config["features"]["batch_size"]},
        "eval_linear": {
            "seed": config["seed"],
            "label_column": evaluation["label_column"],
            "weight_decays": evaluation["probe_weight_decays"],
            "max_iterations": evaluation["probe_iterations"],
        },
        "eval_knn": {"seed": config["seed"], "k": evaluation["knn_k"], "label_column": evaluation["label_column"]},
        "eval_nmi": {
            "seed": config["seed"],
            "k": evaluation["clusters"],
            "seeds": evaluation["nmi_seeds"],
            "iterations": kmeans["iterations"],
        },
        "eval_clusters": {"seed": config["seed"], "shown": evaluation["clusters_shown"]},
        "eval_voc07": {
            **image,
            "seed": config["seed"],
            "epochs": evaluation["voc07_epochs"],
            "batch_size": evaluation["batch_size"],
            "lr": evaluation["voc07_lr"],
            "weight_decay": evaluation["weight_decay"],
        },
        "eval_retrieval": {
            **image,
            "dim": evaluation["retrieval_dim"],
            "eigenvalue_floor": pca["eigenvalue_floor"],
            "batch_size": config["features"]["batch_size"],
        },
        "eval_similarity": {
            **image,
            "images": evaluation["similarity_images"],
            "batch_size": config["features"]["batch_size"],
        },
        "true_labels": {"label_column": config["methods"]["supervised"]["label_column"]},
        "compare_table": {"label_column": evaluation["label_column"]},
        "export": {"image_size": data["image_size"]},
        "curate": {
            "seed": config["seed"],
            "cache_mb": kmeans["cache_mb"],
            "dtype": kmeans["dtype"],
            **{key: config["curation"][key] for key in ("size", "strategy", "duplicate_similarity")},
        },
        "curation_figures": {"seed": config["seed"], "shown": evaluation["clusters_shown"]},
    }.get(rule, {})


@pytest.mark.parametrize("settings", [{}, CHANGED], ids=["defaults", "changed"])
def test_every_rules_options_parse_back_into_its_stages_arguments(tmp_path: Path, settings: dict) -> None:
    config = merged(settings, EVERY_RULE)
    for path in ("mine.pt", "retrieval.csv", "init.pt", "eval.csv"):
        (tmp_path / path).touch()
    (tmp_path / "voc").mkdir()
    full = validate_config(copy.deepcopy(config))
    last = full["methods"][full["method"]]["rounds"]

    jobs = dry_run(tmp_path, config)  # an empty folder: the manifest first
    manifest = tmp_path / "results" / "data"
    manifest.mkdir(parents=True)
    pd.DataFrame({"id": range(full["data"]["max_images"])}).to_parquet(manifest / "manifest.parquet")
    (manifest / "skipped.tsv").touch()
    jobs += dry_run(
        tmp_path,
        config,
        "all",
        "compare",
        f"results/export/round-{last}.pth",
        "results/export/mine.pth",
        f"results/evals/round-{last}/clusters.png",
        f"results/evals/round-{last}/voc07.json",
        f"results/evals/round-{last}/retrieval.json",
        "results/evals/mine/knn.json",
        f"results/curated/round-{last}/figures/clusters.png",
    )

    assert {rule for rule, _ in jobs} == package_rules()
    calls = {rule: [] for rule, _ in jobs}
    for rule, command in jobs:
        call = stage_call(command)
        for name, value in expected(rule, full, call.arguments).items():
            got = call.arguments[name]
            assert got == value, f"{rule} ({call.stage}): {name} is {got!r}, config {value!r}"
        calls[rule].append(call)
    for rule in ("super_clusters", "sub_clusters"):  # k-means levels run as resources.<stage>.tasks ranks
        assert {call.ranks for call in calls[rule]} == {allocation(full["resources"], rule)["tasks"]}
    levels = [call.arguments for call in calls["super_clusters"]]
    assert {a["super_clusters"] for a in levels} == {1, full["methods"]["deepercluster"]["super_clusters"]}
    assert len({a["seed"] for a in levels}) == max(
        full["methods"][m]["rounds"] for m in ("deepercluster", "deepcluster")
    )
    # Every method's block, each with its own settings; DeepCluster re-clusters every round of its run.
    assert {call.arguments["method"] for call in calls["train"]} == {
        "deepercluster",
        "deepcluster",
        "rotnet",
        "supervised",
    }
    rounds = {m: sum(c.arguments["method"] == m for c in calls["train"]) for m in full["methods"]}
    assert rounds == {m: settings["rounds"] for m, settings in full["methods"].items()}


def test_a_job_array_the_slurm_plugin_would_never_submit_is_refused() -> None:
    require_array_fits("features", 960, "features,sub_clusters", 1000)  # a round's shards fit in --jobs
    require_array_fits("features", 960, "sub_clusters", 100)  # not an array
    require_array_fits("features", 960, None, 100)  # not on SLURM
    for arrays in ("features, sub_clusters", "all"):
        with pytest.raises(ConfigError, match=r"features, which has 960 jobs per round, more than jobs \(100\)"):
            require_array_fits("features", 960, arrays, 100)


def test_every_stage_is_run_by_a_rule_and_each_rule_runs_one_stage() -> None:
    """Every stage of `python -m deepercluster` (``stages.STAGES``) is run by exactly one rule, and a rule runs one
    stage at most; but pca and manifest, which the evaluations run again on their own images (eval_pca on a
    checkpoint's features of them, eval_images reading evaluation.data and evaluation.train_data)."""
    text = "\n".join(path.read_text() for path in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    runs: dict[str, list[str]] = {}
    for block in re.split(r"^(?=(?:rule|checkpoint) )", text, flags=re.M)[1:]:
        rule = HEADER.match(block.splitlines()[0]).group(1)
        stages = re.findall(r"python -m deepercluster(?: --[\w-]+ \S+)* ([a-z][\w-]*)", block)
        assert len(stages) <= 1, f"rule {rule} runs {stages}"
        for stage in stages:
            runs.setdefault(stage, []).append(rule)
    assert sorted(runs) == sorted(STAGES)
    assert {stage: sorted(rules) for stage, rules in runs.items() if len(rules) > 1} == {
        "pca": ["eval_pca", "pca"],
        "manifest": ["eval_images", "manifest"],
    }
