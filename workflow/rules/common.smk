import re
import shlex

import pandas as pd

from deepercluster.config import validate_config
from deepercluster.shards import require_rows, shard_count

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))


wildcard_constraints:
    round=r"\d+",
    shard=r"\d+",
    super_cluster=r"\d+",


ENV = "../../envs/deepercluster.yaml"
METHOD = config["method"]
ROUNDS = config["rounds"]
# DeepCluster is the one-super-cluster case; RotNet clusters nothing.
SUPER_CLUSTERS = 1 if METHOD == "deepcluster" else config["kmeans"]["super_clusters"]


def options(**values):
    """Config values as a stage's command-line options: --name value, --flag/--no-flag; None is left out."""
    words = []
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)


def stage_resources(stage):
    """Snakemake resources of a stage's jobs: resources.default, overridden by resources.<stage>."""
    wanted = {**config["resources"]["default"], **config["resources"].get(stage, {})}
    resources = {
        key: wanted[key]
        for key in ("runtime", "mem_mb", "cpus_per_task", "tasks", "nodes")
    }
    if wanted["gpus"]:
        resources["gpu"] = wanted["gpus"]
    if wanted["gpus"] and wanted["gpu_model"]:
        resources["gpu_model"] = wanted["gpu_model"]
    if wanted["tasks"] > 1:
        resources["mpi"] = (
            "srun"  # the stage starts its ranks itself (python -m deepercluster --tasks)
        )
    for key in ("slurm_partition", "slurm_account"):
        if wanted[key]:
            resources[key] = wanted[key]
    return resources


def stage_cpus(stage):
    """Threads of a stage's jobs: its cpus_per_task."""
    return stage_resources(stage)["cpus_per_task"]


def training_allocation():
    """The training block's allocation, as options of `python -m deepercluster train`."""
    wanted = {**config["resources"]["default"], **config["resources"].get("train", {})}
    return options(
        tasks=wanted["tasks"],
        nodes=wanted["nodes"],
        gpus_per_node=wanted["gpus"],
        gpu_model=wanted["gpu_model"],
        cpus_per_task=wanted["cpus_per_task"],
        mem_mb=wanted["mem_mb"],
        timeout_min=wanted["runtime"],
        slurm_partition=wanted["slurm_partition"],
        slurm_account=wanted["slurm_account"],
    )


def shard_files(r):
    """Every feature shard of round r; their number is known once the manifest exists."""
    manifest = checkpoints.manifest.get().output.manifest
    images = pd.read_parquet(manifest, columns=["id"]).shape[0]
    if METHOD == "deepercluster":
        require_rows(SUPER_CLUSTERS, images, "kmeans.super_clusters")
    shards = shard_count(images, config["features"]["shard_size"])
    return [f"results/rounds/{r}/features/shard-{i}.h5" for i in range(shards)]


def sub_cluster_files(r):
    """One level-2 clusters file per super-cluster of round r."""
    return [f"results/rounds/{r}/clusters/sub-{s}.h5" for s in range(SUPER_CLUSTERS)]


def round_file(name):
    """An input function: results/rounds/{round}/<name>, where the method clusters (none for RotNet)."""
    return lambda wildcards: (
        [] if METHOD == "rotnet" else [f"results/rounds/{wildcards.round}/{name}"]
    )


# The pseudo-labels a round trains on (none for RotNet).
round_labels = round_file("labels.parquet")


def round_outputs(r):
    """Every file round r's stages make: deleting any of them reruns it and what depends on it."""
    clustering = [
        *shard_files(r),
        f"results/rounds/{r}/pca.h5",
        f"results/rounds/{r}/clusters/super.h5",
        *sub_cluster_files(r),
        f"results/rounds/{r}/labels.parquet",
    ]
    return [
        *([] if METHOD == "rotnet" else clustering),
        f"results/rounds/{r}/checkpoint.pt",
    ]


def round_files(name):
    """results/rounds/{r}/<name> of every round, where the method clusters (none for RotNet)."""
    if METHOD == "rotnet":
        return []
    return [f"results/rounds/{r}/{name}" for r in range(1, ROUNDS + 1)]


# The report's figures of round {round} (rules/report.smk), each flagged for `snakemake --report`.
FIGURES = "results/rounds/{round}/figures"
ROUND_FIGURES = {
    "training": f"{FIGURES}/training.png",
    **(
        {}
        if METHOD == "rotnet"
        else {
            "sizes_plot": f"{FIGURES}/cluster_sizes.png",
            "nmi_plot": f"{FIGURES}/nmi.png",
            "grid": f"{FIGURES}/clusters.png",
        }
    ),
}


def rounds_until(name):
    """An input function: results/rounds/{i}/<name> of rounds 1..{round} (none for RotNet)."""
    return lambda wildcards: round_files(name)[: int(wildcards.round)]


def figure_options(wildcards, input, output):
    """The stage's figure paths, and the round's clustering files where the method clusters."""
    clustering = dict(
        manifest=input.manifest, labels=input.labels, sizes=input.sizes, nmi=input.nmi
    )
    figures = {name: getattr(output, name) for name in ROUND_FIGURES}
    return options(**figures, **(clustering if input.labels else {}))


def round_benchmarks(wildcards):
    """The benchmark file of every job of every round: the summary's stage times."""
    files = []
    for r in range(1, ROUNDS + 1):
        jobs = ["checkpoint"]
        if METHOD != "rotnet":
            shards = len(shard_files(r))
            jobs += [f"features/shard-{i}" for i in range(shards)]
            jobs += ["pca", "clusters/super", "labels"]
            jobs += [f"clusters/sub-{s}" for s in range(SUPER_CLUSTERS)]
        files += [f"results/benchmarks/rounds/{r}/{job}.tsv" for job in jobs]
    return files


def default_targets(wildcards):
    """Every round's files and report figures, the last checkpoint and the summary (TSV and web page)."""
    return [
        *(output for r in range(1, ROUNDS + 1) for output in round_outputs(r)),
        *(expand(ROUND_FIGURES.values(), round=range(1, ROUNDS + 1))),
        "results/summary.tsv",
        "results/summary.html",
    ]


def round_seed(wildcards):
    """Each round's own seed, derived from the config's."""
    return config["seed"] + 1000 * int(wildcards.round)


def previous_checkpoint(wildcards):
    """Round r's features come from round r-1's checkpoint (round 0: the initial weights)."""
    return f"results/rounds/{int(wildcards.round) - 1}/checkpoint.pt"


def previous_labels(wildcards):
    """The previous round's labels, for the NMI between consecutive rounds (none in round 1)."""
    r = int(wildcards.round)
    return [f"results/rounds/{r - 1}/labels.parquet"] if r > 1 else []


# Evaluations (rules/evaluate.smk): results/evals/{name}/..., name = round-{r} or a key of checkpoints.
EVAL = config["evaluation"]
EVAL_MANIFEST = "results/data/eval/manifest.parquet"
# The features stage's --shard-size for one shard holding every evaluation image.
ALL_IMAGES = 2**31 - 1
# The table's rows, in the paper's order.
COMPARED = {
    label: EVAL["compare"][label]
    for label in ("random", "rotnet", "deepcluster", "deepercluster")
    if EVAL["compare"][label]
}


wildcard_constraints:
    name="|".join([r"round-\d+", *map(re.escape, config["checkpoints"])]),


def eval_checkpoint(wildcards):
    """round-{r}: that round's checkpoint; a registered name: its checked copy."""
    if wildcards.name.startswith("round-"):
        return f"results/rounds/{wildcards.name.removeprefix('round-')}/checkpoint.pt"
    return f"results/checkpoints/{wildcards.name}.pt"


def registered(wildcards):
    """The checkpoints entry of a name as {path, arch, sobel} (arch None, sobel true unless given)."""
    entry = config["checkpoints"][wildcards.name]
    entry = {"path": entry} if isinstance(entry, str) else entry
    return {"arch": None, "sobel": True, **entry}


def eval_rounds(filename):
    """An input function: results/evals/{name}/<filename> of this checkpoint, and for round-{r} of
    rounds 0..r (NMI over rounds)."""

    def files(wildcards):
        if wildcards.name.startswith("round-"):
            r = int(wildcards.name.removeprefix("round-"))
            return [f"results/evals/round-{i}/{filename}" for i in range(r + 1)]
        return [f"results/evals/{wildcards.name}/{filename}"]

    return files


def configured(key):
    """An input function giving evaluation.<key> (a path), or an error naming the key when it is null."""

    def path(wildcards):
        if EVAL[key] is None:
            raise ValueError(
                f"evaluation.{key} is null: set it in the config to make {key}.json"
            )
        return EVAL[key]

    return path


def compared(wildcards):
    """The evaluation files of every checkpoint in evaluation.compare (voc07, retrieval when configured)."""
    if not COMPARED:
        raise ValueError(
            "evaluation.compare names no checkpoint: set some of its keys to make the table"
        )
    kinds = ["linear.json", "knn.json", "nmi.json"]
    kinds += [f"{key}.json" for key in ("voc07", "retrieval") if EVAL[key]]
    return [
        f"results/evals/{name}/{kind}" for name in COMPARED.values() for kind in kinds
    ]
