# Validation, the plan of the runs (deepercluster.plan: every path template and which files a config plans),
# and the small input functions the rules share.
import re

from deepercluster.cluster.rows import require_rows
from deepercluster.config import validate_config
from deepercluster.formats.manifest import manifest_size
from deepercluster.plan import (
    CHECKPOINT,
    COMPARE,
    EVAL_FILE,
    EVAL_MANIFEST,
    EVAL_SKIPPED,
    EXPORT,
    IMPORTED,
    LABELS,
    MAIN,
    MANIFEST,
    METRICS,
    PCA,
    ROUND_NMI,
    SHARD,
    SIZES,
    SKIPPED,
    SUB,
    SUMMARY,
    SUPER,
    TRAIN_DIR,
    Plan,
    benchmark_file,
    fill,
    log_file,
)
from deepercluster.resources import (
    job_resources,
    require_array_fits,
    stage_threads,
    training_allocation,
)
from deepercluster.seeds import derived_seed
from deepercluster.stages import options

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))

ENV = "../../envs/deepercluster.yaml"
RESOURCES = config["resources"]
EVAL = config["evaluation"]
PLAN = Plan(config)
# The rounds that train: 1..rounds (round 0 is the random init).
TRAINED_ROUNDS = range(1, PLAN.rounds + 1)


wildcard_constraints:
    round=r"\d+",
    shard=r"\d+",
    super_cluster=r"\d+",
    run="|".join(map(re.escape, PLAN.runs)),
    name="|".join([r"round-\d+", *map(re.escape, config["checkpoints"])]),


def images():
    """The number of images, known once the manifest exists (a checkpoint rule)."""
    return manifest_size(checkpoints.manifest.get().output.manifest)


def fits_job_array(rule, count):
    """Refuse a round's ``count`` jobs of ``rule`` as a SLURM job array the plugin would never submit."""
    array_jobs = getattr(workflow.executor_settings, "array_jobs", None)
    require_array_fits(rule, count, array_jobs, workflow.resource_settings.nodes)


def shard_files(wildcards):
    """Every feature shard of the run's round (which must hold at least m images)."""
    count = images()
    require_rows(PLAN.super_clusters(wildcards.run), count, "kmeans.super_clusters")
    files = PLAN.shard_files(wildcards.run, wildcards.round, count)
    fits_job_array("features", len(files))
    return files


def sub_cluster_files(wildcards):
    """One level-2 clusters file per super-cluster of the run's round."""
    files = PLAN.sub_cluster_files(wildcards.run, wildcards.round)
    fits_job_array("sub_clusters", len(files))
    return files


def round_file(template):
    """An input function: ``template`` of {run} (the main run in rules without that wildcard) and {round}, where
    the run's method clusters (none for RotNet)."""
    return lambda wildcards: PLAN.clustering_files(
        wildcards.get("run", MAIN), template, [wildcards.round]
    )


def rounds_until(template):
    """An input function: ``template`` of the main run's rounds 1..{round}, where its method clusters."""
    return lambda wildcards: PLAN.clustering_files(
        MAIN, template, range(1, int(wildcards.round) + 1)
    )


def default_targets(wildcards):
    """Every round's files and report figures, the last checkpoint and the summary (TSV and web page)."""
    count = images()
    return [
        *(path for r in TRAINED_ROUNDS for path in PLAN.round_outputs(MAIN, r, count)),
        *(path for r in TRAINED_ROUNDS for path in PLAN.figures(r).values()),
        f"{SUMMARY}.tsv",
        f"{SUMMARY}.html",
    ]


def round_seed(wildcards):
    """Each round's own seed, derived from the config's (seeds.derived_seed)."""
    return derived_seed(config["seed"], int(wildcards.round))


def previous_checkpoint(wildcards):
    """Round r's features and block start from round r-1's checkpoint (round 0: the initial weights)."""
    return PLAN.checkpoint(wildcards.run, int(wildcards.round) - 1)


def previous_labels(wildcards):
    """The previous round's labels, for the NMI between consecutive rounds (none in round 1)."""
    r = int(wildcards.round)
    return [fill(LABELS, run=wildcards.run, round=r - 1)] if r > 1 else []


def eval_checkpoint(wildcards):
    """The checkpoint that {run}/evals/{name} (or {run}/export/{name}.pth) evaluates."""
    return PLAN.checkpoint_file(wildcards.run, wildcards.name)


def registered(wildcards):
    """The checkpoints entry of a name as {path, arch, sobel} (arch None, sobel true unless given)."""
    entry = config["checkpoints"][wildcards.name]
    entry = {"path": entry} if isinstance(entry, str) else entry
    return {"arch": None, "sobel": True, **entry}


def eval_rounds(kind):
    """An input function: {run}/evals/{name}/<kind> of this checkpoint, and for round-{r} of rounds 0..r (NMI
    over rounds)."""

    def files(wildcards):
        if wildcards.name.startswith("round-"):
            r = int(wildcards.name.removeprefix("round-"))
            names = [f"round-{i}" for i in range(r + 1)]
        else:
            names = [wildcards.name]
        return [f"{PLAN.eval_folder(wildcards.run, name)}/{kind}" for name in names]

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


def summary_benchmarks(wildcards):
    """The benchmark file of every job of every round of the main run, by round and stage."""
    count = images()
    return {r: PLAN.round_benchmarks(r, count) for r in TRAINED_ROUNDS}


COMPARED = PLAN.compared()


def compared_evals(wildcards):
    """The evaluation files of every row of the table (voc07, retrieval when configured)."""
    kinds = ["linear.json", "knn.json", "nmi.json"]
    kinds += [f"{key}.json" for key in ("voc07", "retrieval") if EVAL[key]]
    return [
        f"{PLAN.eval_folder(*row)}/{kind}"
        for row in COMPARED.values()
        for kind in kinds
    ]


def compared_rounds(wildcards):
    """Every file of the rounds of each row's run up to its checkpoint (its checked copy for a name)."""
    count, files = images(), []
    for run, name in COMPARED.values():
        last = int(name.removeprefix("round-")) if name.startswith("round-") else 0
        files += [
            path
            for r in range(1, last + 1)
            for path in PLAN.round_outputs(run, r, count)
        ]
        files.append(PLAN.checkpoint_file(run, name))
    return files


# Report flags (`snakemake --report`): each evaluation's figure or table, the comparison's, each round's figures.


def evaluation(kind):
    """{run}/evals/{name}/<kind>: an evaluation's file."""
    return fill(EVAL_FILE, kind=kind)


def reported(kind, caption, title):
    """An evaluation's file flagged for the report, under the checkpoint's name."""
    return report(
        evaluation(kind),
        caption=f"../report/{caption}.rst",
        category="Evaluations",
        subcategory="{name}",
        labels={"run": "{run}", "checkpoint": "{name}", "evaluation": title},
    )


def compared_report(name, title):
    """A file of results/compare/ flagged for the report."""
    return report(
        f"{COMPARE}/{name}",
        caption="../report/compare.rst",
        category="Evaluations",
        subcategory="compare",
        labels={"run": "compare", "checkpoint": "compared", "evaluation": title},
    )


FIGURE_TITLES = {
    "training": "training curves",
    "sizes_plot": "cluster sizes",
    "nmi_plot": "NMI over rounds",
    "grid": "images of a few clusters",
}
ROUND_REPORT = {
    name: report(
        path,
        caption=f"../report/{name}.rst",
        category="Rounds",
        subcategory="round {round}",
        labels={"round": "{round}", "figure": FIGURE_TITLES[name]},
    )
    for name, path in PLAN.figures().items()
}


def figure_options(wildcards, input, output):
    """The stage's figure paths, and the round's clustering files where the method clusters."""
    clustering = dict(
        manifest=input.manifest, labels=input.labels, sizes=input.sizes, nmi=input.nmi
    )
    figures = {name: getattr(output, name) for name in ROUND_REPORT}
    return options(**figures, **(clustering if input.labels else {}))
