"""Where every file of the workflow is, and what a config plans: its runs, their rounds and each round's files.

The rules name their outputs with the templates below and plan their inputs with ``Plan``; the summary, the
report and the comparison find files through the same functions, so a path is spelled in one place. Torch-free:
Snakemake imports it when it parses the workflow.

A run is a folder ``{run}`` holding ``rounds/``, ``evals/``, ``logs/`` and ``benchmarks/``, one per method: the
main run ``results`` (the config's method) and ``results/{method}`` for each other, which the comparison (rule
compare) trains, and which a method starting from another's checkpoint (DeeperCluster from RotNet, ``init:
rotnet``) trains first. A run's round 0 is where it starts: the seeded random init ``results/rounds/0``, the
RotNet run's last round, or a registered checkpoint; its files and evaluations are that checkpoint's own.

A curated subset ``results/curated/{name}`` is drawn from the clusters of the pool (``results/data/manifest``) that
checkpoint ``{name}`` gives (``curated_clusters``); with ``curation.train`` one more run,
``results/curated/{name}/{method}``, trains on that subset's manifest instead of the pool's (``manifest``): the pool's
run and the curated run are two folders of one DAG, the second downstream of the first.
"""

from __future__ import annotations

from typing import Any

from deepercluster.errors import ConfigError
from deepercluster.methods import METHODS, Method, method

MAIN = "results"
MANIFEST = "results/data/manifest.parquet"
SKIPPED = "results/data/skipped.tsv"
EVAL_DATA = "results/data/eval"
EVAL_MANIFEST = EVAL_DATA + "/manifest.parquet"

ROUND = "{run}/rounds/{round}"
CHECKPOINT = ROUND + "/checkpoint.pt"
TRAIN_DIR = ROUND + "/train"
METRICS = TRAIN_DIR + "/metrics.tsv"
SHARD = ROUND + "/features/shard-{shard}.h5"
PCA = ROUND + "/pca.h5"
SUPER = ROUND + "/clusters/super.h5"
SUB = ROUND + "/clusters/sub-{super_cluster}.h5"
LABELS = ROUND + "/labels.parquet"
SIZES = ROUND + "/cluster_sizes.tsv"
ROUND_NMI = ROUND + "/nmi.json"
TRUE_LABELS = "{run}/true_labels.parquet"
FIGURE = "results/rounds/{round}/figures/{figure}.png"

IMPORTED = "results/checkpoints/{name}.pt"
EVAL = "{run}/evals/{name}"
EVAL_FILE = EVAL + "/{kind}"
SIMILARITY = "{run}/evals/similarity"
EXPORT = "{run}/export/{name}.pth"
CURATED = "results/curated/{name}"
CURATED_MANIFEST = CURATED + "/manifest.parquet"
CURATED_SIZES = CURATED + "/cluster_sizes.tsv"
CURATED_FIGURE = CURATED + "/figures/{figure}.png"
SUMMARY = "results/summary"
COMPARE = "results/compare"

# The report's figures of a round (figure name -> file stem); those past the first only where the method clusters.
ROUND_FIGURES = {"training": "training", "sizes_plot": "cluster_sizes", "nmi_plot": "nmi", "grid": "clusters"}
# A curated subset's figures (figure name -> file stem).
CURATION_FIGURES = {"sizes_plot": "cluster_sizes", "grid": "clusters"}
# The comparison's rows, in the paper's order (Table 3), then the bound.
ROW_ORDER = ("random", "rotnet", "deepcluster", "deepercluster", "supervised")
STARTS = ("random", "rotnet")  # a method's init, besides a name under checkpoints


def shard_count(images: int, shard_size: int) -> int:
    """Number of shards of ``shard_size`` images (the last one may be smaller)."""
    return max(1, -(-images // shard_size))


def curation_figures(name: str = "{name}") -> dict[str, str]:
    """The figures of the curated subset ``name``, by name."""
    return {figure: fill(CURATED_FIGURE, name=name, figure=stem) for figure, stem in CURATION_FIGURES.items()}


def fill(template: str, **values: object) -> str:
    """``template`` with the wildcards ``values`` names filled in and the others left as they are."""
    for name, value in values.items():
        template = template.replace(f"{{{name}}}", str(value))
    return template


def log_file(output: str) -> str:
    """The log of the job making ``output``: the same path under its run's ``logs/``, ending in ``.log``."""
    return _mirror(output, "logs", ".log")


def benchmark_file(output: str) -> str:
    """The benchmark of the job making ``output``: the same path under its run's ``benchmarks/``, ending in ``.tsv``."""
    return _mirror(output, "benchmarks", ".tsv")


def _mirror(output: str, folder: str, suffix: str) -> str:
    run, rest = ("{run}", output.removeprefix("{run}/")) if output.startswith("{run}/") else output.split("/", 1)
    return f"{run}/{folder}/{rest.rsplit('.', 1)[0]}{suffix}"


class Plan:
    """The runs of a config and the files of their rounds; ``images`` is the manifest's size wherever a number of
    shards depends on it (known once the manifest exists)."""

    curated: str | None = None  # the curated run's folder (curation.train), once the config is checked

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.method = method(config["method"])
        self.runs: dict[str, Method] = {self.folder(m): m for m in METHODS.values()}
        for name, settings in config["methods"].items():
            start = settings["init"]
            if (start not in STARTS and start not in config["checkpoints"]) or start == name:
                valid = [s for s in STARTS if s != name] + list(config["checkpoints"])
                raise ConfigError(
                    f"methods.{name}.init is {start!r}; set it to one of {', '.join(valid)} "
                    "(a checkpoint's name must be under checkpoints)"
                )
        self.curated = self.curated_run(config["curation"])
        if self.curated:
            self.runs[self.curated] = METHODS[config["curation"]["train"]]

    def folder(self, of: Method) -> str:
        """The run of a method: the main run for the config's, results/{method} for the others."""
        return MAIN if of == self.method else f"{MAIN}/{of.name}"

    def curated_run(self, curation: dict[str, Any]) -> str | None:
        """The run of curation.train on the subset of curation.clusters (checked to name clusters), or None."""
        if curation["clusters"] is not None:
            self.curated_clusters(curation["clusters"])
        if curation["train"] is None:
            return None
        if curation["clusters"] is None:
            raise ConfigError(
                f"curation.train is {curation['train']!r} but curation.clusters is null: set it to the round-{{r}} "
                "(or the checkpoint under checkpoints) whose clusters the subset it trains on is drawn from"
            )
        return f"{fill(CURATED, name=curation['clusters'])}/{curation['train']}"

    def manifest(self, run: str) -> str:
        """The images a run trains on: the curated subset's for the curated run, the pool's for every other."""
        return fill(CURATED_MANIFEST, name=self.config["curation"]["clusters"]) if run == self.curated else MANIFEST

    def curated_clusters(self, name: str) -> tuple[str, int]:
        """The round (run, r) whose clusters of the pool a curated subset ``name`` is drawn from: round-{r}'s of the
        main run; a checkpoint under checkpoints, round 1's of the pool's run starting from it (clustered with its
        features). A round of a method that does not cluster, or a checkpoint no run starts from, is an error."""
        if name.startswith("round-"):
            r, run = int(name.removeprefix("round-")), MAIN
            if not self.runs[MAIN].clusters:
                raise ConfigError(
                    f"results/curated/{name}: the main run's method, {self.method.name}, makes no clusters; curate a "
                    "round of a method that does (method: deepercluster or deepcluster)"
                )
            if not 1 <= r <= self.rounds(MAIN):
                raise ConfigError(
                    f"results/curated/{name}: the main run has no round {r} with clusters; curate one of "
                    f"round-1..round-{self.rounds(MAIN)}"
                )
            return run, r
        for of in METHODS.values():  # the pool's runs
            if of.clusters and self.settings(self.folder(of))["init"] == name:
                return self.folder(of), 1
        raise ConfigError(
            f"results/curated/{name}: no run clusters the pool with checkpoint {name}'s features; set "
            f"methods.deepercluster.init (or methods.deepcluster.init) to {name}, whose round 1 clusters with them"
        )

    def settings(self, run: str) -> dict[str, Any]:
        """methods.<method> of the run's method (for the curated run, with curation.epochs_per_round where set)."""
        own, epochs = self.config["methods"][self.runs[run].name], self.config["curation"]["epochs_per_round"]
        return {**own, "epochs_per_round": epochs} if run == self.curated and epochs is not None else own

    def rounds(self, run: str) -> int:
        return self.settings(run)["rounds"]

    def super_clusters(self, run: str) -> int:
        """m of a run's rounds: DeeperCluster's configured m; 1 for the others."""
        return 1 if self.runs[run].one_super_cluster else self.settings(run)["super_clusters"]

    def sub_clusters(self, run: str) -> int:
        """k of each super-cluster of a run's rounds (DeepCluster: its clusters)."""
        settings = self.settings(run)
        return settings["clusters"] if "clusters" in settings else settings["sub_clusters"]

    def shards(self, images: int) -> int:
        return shard_count(images, self.config["features"]["shard_size"])

    def start(self, run: str) -> tuple[str, str]:
        """Where a run's round 0 is, as (run, checkpoint name): the random init is the main run's round 0, RotNet
        the RotNet run's last round, any other name a registered checkpoint."""
        start = self.settings(run)["init"]
        if start == "random":
            return MAIN, "round-0"
        if start == "rotnet":
            rotnet = self.folder(METHODS["rotnet"])
            return rotnet, f"round-{self.rounds(rotnet)}"
        return MAIN, start

    def checkpoint_file(self, run: str, name: str) -> str:
        """round-{r}: that round's checkpoint of the run (round-0: the seeded random init, every run's); a
        registered name: its checked copy."""
        if not name.startswith("round-"):
            return fill(IMPORTED, name=name)
        r = int(name.removeprefix("round-"))
        return fill(CHECKPOINT, run=MAIN if r == 0 else run, round=r)

    def checkpoint(self, run: str, r: int) -> str:
        """The checkpoint of a run's round r; round 0 is where the run starts (``start``)."""
        return self.checkpoint_file(*(self.start(run) if r == 0 else (run, f"round-{r}")))

    @staticmethod
    def eval_folder(run: str, name: str) -> str:
        """Where a checkpoint's evaluations are: round-0's (the random init) are the main run's, as its checkpoint."""
        return fill(EVAL, run=MAIN if name == "round-0" else run, name=name)

    def rounds_until(self, run: str, name: str) -> list[tuple[str, str]]:
        """The checkpoints (run, name) of a run's rounds 0..r for ``name`` round-{r} (r > 0), round 0 its start; a
        registered name, or round-0, alone."""
        last = int(name.removeprefix("round-")) if name.startswith("round-") else 0
        if not last:
            return [(run, name)]
        return [self.start(run), *((run, f"round-{r}") for r in range(1, last + 1))]

    def shard_files(self, run: str, r: int, images: int) -> list[str]:
        return [fill(SHARD, run=run, round=r, shard=i) for i in range(self.shards(images))]

    def sub_cluster_files(self, run: str, r: int) -> list[str]:
        return [fill(SUB, run=run, round=r, super_cluster=s) for s in range(self.super_clusters(run))]

    def clustering_files(self, run: str, template: str, rounds: range | list) -> list[str]:
        """``template`` of each of the rounds, where the run's method clusters."""
        return [fill(template, run=run, round=r) for r in rounds] if self.runs[run].clusters else []

    def labels(self, run: str, r: int) -> list[str]:
        """The labels of a run's round r's block: the round's pseudo-labels, the true classes (supervised) or none
        (RotNet)."""
        of = self.runs[run]
        if of.clusters:
            return [fill(LABELS, run=run, round=r)]
        return [fill(TRUE_LABELS, run=run)] if of.labelled else []

    def round_outputs(self, run: str, r: int, images: int) -> list[str]:
        """Every file a run's round r's stages make: deleting any of them reruns it and what depends on it."""
        trained = fill(CHECKPOINT, run=run, round=r)
        if not self.runs[run].clusters:  # RotNet, supervised: the training block alone
            return [*self.labels(run, r), trained]
        one = {"run": run, "round": r}
        return [
            *self.shard_files(run, r, images),
            fill(PCA, **one),
            fill(SUPER, **one),
            *self.sub_cluster_files(run, r),
            fill(LABELS, **one),
            trained,
        ]

    def run_outputs(self, run: str, images: int) -> list[str]:
        """Every round's files of a run and of the run it starts from (DeeperCluster's RotNet)."""
        before = self.run_outputs(self.start(run)[0], images) if self.settings(run)["init"] == "rotnet" else []
        return [*before, *(path for r in range(1, self.rounds(run) + 1) for path in self.round_outputs(run, r, images))]

    def round_benchmarks(self, r: int, images: int) -> dict[str, list[str]]:
        """The benchmark files of each stage of the main run's round r (the summary's stage times)."""
        jobs = {"train": [fill(CHECKPOINT, run=MAIN, round=r)]}
        if self.method.clusters:
            jobs = {
                "features": self.shard_files(MAIN, r, images),
                "pca": [fill(PCA, run=MAIN, round=r)],
                "super_clusters": [fill(SUPER, run=MAIN, round=r)],
                "sub_clusters": self.sub_cluster_files(MAIN, r),
                "labels": [fill(LABELS, run=MAIN, round=r)],
                **jobs,
            }
        return {stage: [benchmark_file(path) for path in paths] for stage, paths in jobs.items()}

    def figures(self, r: int | str = "{round}") -> dict[str, str]:
        """The report's figures of the main run's round r, by name."""
        names = list(ROUND_FIGURES) if self.method.clusters else ["training"]
        return {name: fill(FIGURE, round=r, figure=ROUND_FIGURES[name]) for name in names}

    def compared(self) -> dict[str, tuple[str, str]]:
        """The table's rows in order, as {row: (run, name)}: the checkpoint named under evaluation.compare, else the
        random init (round 0) and each method's last round (of the main run for the config's method)."""
        named = self.config["evaluation"]["compare"]
        rows = {"random": (MAIN, "round-0")} | {
            m.name: (run, f"round-{self.rounds(run)}") for m in METHODS.values() for run in [self.folder(m)]
        }
        return {row: (MAIN, named[row]) if named[row] else rows[row] for row in ROW_ORDER}
