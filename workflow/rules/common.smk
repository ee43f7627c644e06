import re

import pandas as pd

from deepercluster.config import validate_config
from deepercluster.methods import clusters, runs, super_clusters
from deepercluster.resources import (
    job_resources,
    require_array_fits,
    stage_threads,
    training_allocation,
)
from deepercluster.seeds import derived_seed
from deepercluster.shards import require_rows, shard_count
from deepercluster.stages import options

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))


wildcard_constraints:
    round=r"\d+",
    shard=r"\d+",
    super_cluster=r"\d+",


ENV = "../../envs/deepercluster.yaml"
METHOD = config["method"]
ROUNDS = config["rounds"]
# The rounds that train: 1..rounds (round 0 is the random init).
TRAINED_ROUNDS = range(1, ROUNDS + 1)
RESOURCES = config["resources"]
# Runs, each a folder {run} holding rounds/, evals/, logs/, benchmarks/: the main run (results, the
# config's method) and, for the comparison (rule compare), one run of each other method with the same
# config under results/compare/{method}. They share the data and round 0 (the seeded random init).
RUNS = runs(METHOD)


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)),


def run_super_clusters(run):
    """m of a run's rounds, by its method (methods.super_clusters)."""
    return super_clusters(RUNS[run], config["kmeans"]["super_clusters"])


def round_folder(run, r):
    """{run}/rounds/{r}; round 0, the random init, is the main run's, shared by every run."""
    return f"{'results' if int(r) == 0 else run}/rounds/{r}"


def fits_job_array(rule, count):
    """Refuse a round's ``count`` jobs of ``rule`` as a SLURM job array the plugin would never submit."""
    array_jobs = getattr(workflow.executor_settings, "array_jobs", None)
    require_array_fits(rule, count, array_jobs, workflow.resource_settings.nodes)


def shard_files(run, r):
    """Every feature shard of a run's round r; their number is known once the manifest exists."""
    manifest = checkpoints.manifest.get().output.manifest
    images = pd.read_parquet(manifest, columns=["id"]).shape[0]
    require_rows(run_super_clusters(run), images, "kmeans.super_clusters")
    shards = shard_count(images, config["features"]["shard_size"])
    fits_job_array("features", shards)
    return [f"{run}/rounds/{r}/features/shard-{i}.h5" for i in range(shards)]


def sub_cluster_files(run, r):
    """One level-2 clusters file per super-cluster of a run's round r."""
    m = run_super_clusters(run)
    fits_job_array("sub_clusters", m)
    return [f"{run}/rounds/{r}/clusters/sub-{s}.h5" for s in range(m)]


def clustering_files(run, name, rounds):
    """{run}/rounds/{r}/<name> of each of the rounds, where the run's method clusters (none for RotNet)."""
    return [f"{run}/rounds/{r}/{name}" for r in rounds] if clusters(RUNS[run]) else []


def round_file(name):
    """An input function: {run}/rounds/{round}/<name>, {run} the main run in rules without that wildcard
    (clustering_files)."""
    return lambda wildcards: clustering_files(
        wildcards.get("run", "results"), name, [wildcards.round]
    )


def round_outputs(run, r):
    """Every file a run's round r's stages make: deleting any of them reruns it and what depends on it."""
    trained = f"{run}/rounds/{r}/checkpoint.pt"
    if not clusters(RUNS[run]):  # RotNet: the training block alone
        return [trained]
    return [
        *shard_files(run, r),
        f"{run}/rounds/{r}/pca.h5",
        f"{run}/rounds/{r}/clusters/super.h5",
        *sub_cluster_files(run, r),
        f"{run}/rounds/{r}/labels.parquet",
        trained,
    ]


# The report's figures of round {round} (rules/report.smk), each flagged for `snakemake --report`.
FIGURES = "results/rounds/{round}/figures"
ROUND_FIGURES = {
    "training": f"{FIGURES}/training.png",
    **(
        {
            "sizes_plot": f"{FIGURES}/cluster_sizes.png",
            "nmi_plot": f"{FIGURES}/nmi.png",
            "grid": f"{FIGURES}/clusters.png",
        }
        if clusters(METHOD)
        else {}
    ),
}


def rounds_until(name):
    """An input function: results/rounds/{i}/<name> of rounds 1..{round} (clustering_files)."""
    return lambda wildcards: clustering_files(
        "results", name, range(1, int(wildcards.round) + 1)
    )


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
    for r in TRAINED_ROUNDS:
        jobs = ["checkpoint"]
        if clusters(METHOD):
            shards = len(shard_files("results", r))
            jobs += [f"features/shard-{i}" for i in range(shards)]
            jobs += ["pca", "clusters/super", "labels"]
            jobs += [f"clusters/sub-{s}" for s in range(run_super_clusters("results"))]
        files += [f"results/benchmarks/rounds/{r}/{job}.tsv" for job in jobs]
    return files


def default_targets(wildcards):
    """Every round's files and report figures, the last checkpoint and the summary (TSV and web page)."""
    return [
        *(output for r in TRAINED_ROUNDS for output in round_outputs("results", r)),
        *expand(ROUND_FIGURES.values(), round=TRAINED_ROUNDS),
        "results/summary.tsv",
        "results/summary.html",
    ]


def round_seed(wildcards):
    """Each round's own seed, derived from the config's (seeds.derived_seed)."""
    return derived_seed(config["seed"], int(wildcards.round))


def previous_checkpoint(wildcards):
    """Round r's features come from round r-1's checkpoint (round 0: the initial weights)."""
    return f"{round_folder(wildcards.run, int(wildcards.round) - 1)}/checkpoint.pt"


def previous_labels(wildcards):
    """The previous round's labels, for the NMI between consecutive rounds (none in round 1)."""
    r = int(wildcards.round)
    return [f"{wildcards.run}/rounds/{r - 1}/labels.parquet"] if r > 1 else []


# Evaluations (rules/evaluate.smk): {run}/evals/{name}/..., name = round-{r} or a key of checkpoints.
EVAL = config["evaluation"]
EVAL_MANIFEST = "results/data/eval/manifest.parquet"
# The features stage's --shard-size for one shard holding every evaluation image.
ALL_IMAGES = 2**31 - 1


wildcard_constraints:
    name="|".join([r"round-\d+", *map(re.escape, config["checkpoints"])]),


def checkpoint_file(run, name):
    """round-{r}: that round's checkpoint of the run; a registered name: its checked copy."""
    if name.startswith("round-"):
        return f"{round_folder(run, name.removeprefix('round-'))}/checkpoint.pt"
    return f"results/checkpoints/{name}.pt"


def eval_checkpoint(wildcards):
    """The checkpoint that {run}/evals/{name} (or {run}/export/{name}.pth) evaluates."""
    return checkpoint_file(wildcards.run, wildcards.name)


def eval_folder(run, name):
    """Where a checkpoint's evaluations are: round 0's are the main run's, as its checkpoint."""
    return f"{'results' if name == 'round-0' else run}/evals/{name}"


def registered(wildcards):
    """The checkpoints entry of a name as {path, arch, sobel} (arch None, sobel true unless given)."""
    entry = config["checkpoints"][wildcards.name]
    entry = {"path": entry} if isinstance(entry, str) else entry
    return {"arch": None, "sobel": True, **entry}


def eval_rounds(filename):
    """An input function: {run}/evals/{name}/<filename> of this checkpoint, and for round-{r} of
    rounds 0..r (NMI over rounds)."""

    def files(wildcards):
        if wildcards.name.startswith("round-"):
            r = int(wildcards.name.removeprefix("round-"))
            names = [f"round-{i}" for i in range(r + 1)]
        else:
            names = [wildcards.name]
        return [f"{eval_folder(wildcards.run, name)}/{filename}" for name in names]

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


# The table's rows, in the paper's order.
ROW_ORDER = ["random", "rotnet", "deepcluster", "deepercluster"]


def compared():
    """The table's rows in the paper's order, as {method: (run, name)}: the checkpoint named under
    evaluation.compare, else the random init (round 0) and each method's last round: the main run's for
    the config's method, a run of its own under results/compare/{method} for the others.
    """
    runs = {method: run for run, method in RUNS.items()}
    rows = {"random": ("results", "round-0")}
    rows |= {method: (runs[method], f"round-{ROUNDS}") for method in runs}
    return {
        method: ("results", EVAL["compare"][method]) if EVAL["compare"][method] else row
        for method, row in sorted(rows.items(), key=lambda row: ROW_ORDER.index(row[0]))
    }


COMPARED = compared()


def compared_evals(wildcards):
    """The evaluation files of every row of the table (voc07, retrieval when configured)."""
    kinds = ["linear.json", "knn.json", "nmi.json"]
    kinds += [f"{key}.json" for key in ("voc07", "retrieval") if EVAL[key]]
    return [
        f"{eval_folder(*row)}/{kind}" for row in COMPARED.values() for kind in kinds
    ]


def compared_rounds(wildcards):
    """Every file of the rounds of each row's run up to its checkpoint (its checked copy for a name)."""
    files = []
    for run, name in COMPARED.values():
        last = int(name.removeprefix("round-")) if name.startswith("round-") else 0
        files += [file for r in range(1, last + 1) for file in round_outputs(run, r)]
        files.append(checkpoint_file(run, name))
    return files
