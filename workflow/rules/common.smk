# Validation, the plan of the runs (deepercluster.plan: every path template and which files a config plans),
# and the small input functions the rules share.
import re

from deepercluster.cluster.rows import require_rows
from deepercluster.config import validate_config
from deepercluster.formats.manifest import manifest_size
from deepercluster.plan import (
    CHECKPOINT,
    COMPARE,
    CURATED_MANIFEST,
    CURATED_SIZES,
    EVAL_DATA,
    EVAL_FILE,
    EVAL_MANIFEST,
    EXPORT,
    IMPORTED,
    LABELS,
    MAIN,
    MANIFEST,
    METRICS,
    PCA,
    ROUND_NMI,
    SHARD,
    SIMILARITY,
    SIZES,
    SKIPPED,
    SUB,
    SUMMARY,
    SUPER,
    TRAIN_DIR,
    TRUE_LABELS,
    Plan,
    benchmark_file,
    curation_figures,
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
from deepercluster.train.settings import BlockSettings

validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))

ENV = "../../envs/deepercluster.yaml"
RESOURCES = config["resources"]
# A round's stages (features to the training block) before any evaluation, when both wait for cores: each run's
# rounds are one chain, job after job, while the evaluations of finished rounds are independent and fill the cores
# the chains leave free (without it, --cores 2 on docs/science.yaml ran the evaluations first: DeepCluster was at
# round 2 of 30 after 37 minutes).
ROUND_PRIORITY = 10
EVAL = config["evaluation"]
PLAN = Plan(config)
# The main run's rounds that train: 1..rounds (round 0 is where it starts).
TRAINED_ROUNDS = range(1, PLAN.rounds(MAIN) + 1)


wildcard_constraints:
    round=r"\d+",
    shard=r"\d+",
    super_cluster=r"\d+",
    run="|".join(map(re.escape, PLAN.runs)),
    name="|".join([r"round-\d+", *map(re.escape, config["checkpoints"])]),


def images(run=MAIN):
    """The number of images a run trains on, known once its manifest exists (a checkpoint rule): the pool's, or
    for the curated run (curation.train) the curated subset's."""
    if run == PLAN.curated:
        curated = checkpoints.curate.get(name=config["curation"]["clusters"])
        return manifest_size(curated.output.manifest)
    return manifest_size(checkpoints.manifest.get().output.manifest)


def run_manifest(wildcards):
    """The manifest of the images the run trains on (the curated subset's for the curated run)."""
    return PLAN.manifest(wildcards.run)


def fits_job_array(rule, count):
    """Refuse a round's ``count`` jobs of ``rule`` as a SLURM job array the plugin would never submit."""
    array_jobs = getattr(workflow.executor_settings, "array_jobs", None)
    require_array_fits(rule, count, array_jobs, workflow.resource_settings.nodes)


def shard_files(wildcards):
    """Every feature shard of the run's round (which must hold at least m images)."""
    count = images(wildcards.run)
    require_rows(
        PLAN.super_clusters(wildcards.run),
        count,
        "methods.deepercluster.super_clusters",
    )
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
    """Every round's files (and those of the run it starts from) and report figures, the last checkpoint and the
    summary (TSV and web page); the curated subset of curation.clusters and its figures, and the curated run's
    rounds (curation.train), when set."""
    return [
        *PLAN.run_outputs(MAIN, images()),
        *(path for r in TRAINED_ROUNDS for path in PLAN.figures(r).values()),
        f"{SUMMARY}.tsv",
        f"{SUMMARY}.html",
        *curated_targets(config["curation"]["clusters"]),
    ]


def curated_targets(name):
    """The curated subset ``name`` and its figures, and the curated run's rounds; none for None."""
    if name is None:
        return []
    trained = (
        PLAN.run_outputs(PLAN.curated, images(PLAN.curated)) if PLAN.curated else []
    )
    return [
        fill(CURATED_MANIFEST, name=name),
        *curation_figures(name).values(),
        *trained,
    ]


def curated_round(template):
    """An input function: ``template`` of the round whose clusters the curated subset {name} is drawn from."""

    def path(wildcards):
        run, r = PLAN.curated_clusters(wildcards.name)
        return fill(template, run=run, round=r)

    return path


def curated_shards(wildcards):
    """The feature shards of the round whose clusters the curated subset {name} is drawn from."""
    return PLAN.shard_files(*PLAN.curated_clusters(wildcards.name), images())


def curated_sub_files(wildcards):
    """The sub-clusters files of the round whose clusters the curated subset {name} is drawn from."""
    return PLAN.sub_cluster_files(*PLAN.curated_clusters(wildcards.name))


def round_seed(wildcards):
    """Each round's own seed, derived from the config's (seeds.derived_seed)."""
    return derived_seed(config["seed"], int(wildcards.round))


def previous_checkpoint(wildcards):
    """Round r's features and block start from round r-1's checkpoint (round 0: the initial weights)."""
    return PLAN.checkpoint(wildcards.run, int(wildcards.round) - 1)


def block_labels(wildcards):
    """The labels of the run's round's block: pseudo-labels, the true classes (supervised) or none (RotNet)."""
    return PLAN.labels(wildcards.run, int(wildcards.round))


def block_options(wildcards):
    """The training block's method and settings (BlockSettings: methods.<method>, train, the round's seed)."""
    own = PLAN.settings(wildcards.run)
    settings = BlockSettings.of(config, own, round_seed(wildcards))
    return options(method=PLAN.runs[wildcards.run].name, settings=settings)


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
    """An input function: {run}/evals/{name}/<kind> of this checkpoint, and for round-{r} of the run's rounds 0..r
    (NMI over rounds; round 0 is where the run starts)."""
    return lambda wildcards: [
        f"{PLAN.eval_folder(*checkpoint)}/{kind}"
        for checkpoint in PLAN.rounds_until(wildcards.run, wildcards.name)
    ]


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
    """Every file of the rounds of each trained row's run (and of the run it starts from), each row's checkpoint
    (its checked copy for a name) and each trained run's similarity over rounds."""
    count, files = images(), []
    for row, (run, name) in COMPARED.items():
        files.append(PLAN.checkpoint_file(run, name))
        if row != "random" and not EVAL["compare"][row]:
            files += [*PLAN.run_outputs(run, count), f"{fill(SIMILARITY, run=run)}.tsv"]
    return files


def similarity_checkpoints(wildcards):
    """The checkpoints of the run's rounds 0..R."""
    return [
        PLAN.checkpoint(wildcards.run, r) for r in range(PLAN.rounds(wildcards.run) + 1)
    ]


def eval_role(role):
    """The images of an evaluation role: test (evaluation.data), or train (evaluation.train_data; null: the
    images the methods trained on, the training manifest)."""
    if role == "train" and EVAL["train_data"] is None:
        return MANIFEST
    return f"{EVAL_DATA}/{role}.parquet"


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


CURATION_TITLES = {
    "sizes_plot": "cluster sizes, subset and pool",
    "grid": "images of a few super-clusters, pool and subset",
}
CURATION_REPORT = {
    name: report(
        path,
        caption="../report/curation.rst",
        category="Curation",
        subcategory="{name}",
        labels={"subset": "{name}", "figure": CURATION_TITLES[name]},
    )
    for name, path in curation_figures().items()
}
