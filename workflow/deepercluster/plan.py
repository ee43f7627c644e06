"""Where every file of the workflow is, and what a config plans: its runs, their rounds and each round's files.

The rules name their outputs with the templates below and plan their inputs with ``Plan``; the summary, the
report and the comparison find files through the same functions, so a path is spelled in one place. Torch-free:
Snakemake imports it when it parses the workflow.

A run is a folder ``{run}`` holding ``rounds/``, ``evals/``, ``logs/`` and ``benchmarks/``: the main run
(``results``, the config's method) and, for the comparison (rule compare), one run of each other method under
``results/compare/{method}``. They share the data and round 0 (the seeded random init).
"""

from __future__ import annotations

from typing import Any

from deepercluster.methods import METHODS, Method, method

MAIN = "results"
MANIFEST = "results/data/manifest.parquet"
SKIPPED = "results/data/skipped.tsv"
EVAL_MANIFEST = "results/data/eval/manifest.parquet"
EVAL_SKIPPED = "results/data/eval/skipped.tsv"

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
FIGURE = "results/rounds/{round}/figures/{figure}.png"

IMPORTED = "results/checkpoints/{name}.pt"
EVAL = "{run}/evals/{name}"
EVAL_FILE = EVAL + "/{kind}"
EXPORT = "{run}/export/{name}.pth"
SUMMARY = "results/summary"
COMPARE = "results/compare"

# The report's figures of a round (figure name -> file stem); those past the first only where the method clusters.
ROUND_FIGURES = {"training": "training", "sizes_plot": "cluster_sizes", "nmi_plot": "nmi", "grid": "clusters"}
# The comparison's rows, in the paper's order (Table 3).
ROW_ORDER = ("random", "rotnet", "deepcluster", "deepercluster")


def shard_count(images: int, shard_size: int) -> int:
    """Number of shards of ``shard_size`` images (the last one may be smaller)."""
    return max(1, -(-images // shard_size))


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

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.method = method(config["method"])
        self.rounds = config["rounds"]
        others = {f"{COMPARE}/{name}": m for name, m in METHODS.items() if m != self.method}
        self.runs: dict[str, Method] = {MAIN: self.method, **others}

    def super_clusters(self, run: str) -> int:
        """m of a run's rounds, by its method."""
        return self.runs[run].super_clusters(self.config["kmeans"]["super_clusters"])

    def shards(self, images: int) -> int:
        return shard_count(images, self.config["features"]["shard_size"])

    def round_folder(self, run: str, r: int) -> str:
        """{run}/rounds/{r}; round 0, the random init, is the main run's, shared by every run."""
        return fill(ROUND, run=MAIN if int(r) == 0 else run, round=r)

    def checkpoint(self, run: str, r: int) -> str:
        return f"{self.round_folder(run, r)}/checkpoint.pt"

    def shard_files(self, run: str, r: int, images: int) -> list[str]:
        return [fill(SHARD, run=run, round=r, shard=i) for i in range(self.shards(images))]

    def sub_cluster_files(self, run: str, r: int) -> list[str]:
        return [fill(SUB, run=run, round=r, super_cluster=s) for s in range(self.super_clusters(run))]

    def clustering_files(self, run: str, template: str, rounds: range | list) -> list[str]:
        """``template`` of each of the rounds, where the run's method clusters (none for RotNet)."""
        return [fill(template, run=run, round=r) for r in rounds] if self.runs[run].clusters else []

    def round_outputs(self, run: str, r: int, images: int) -> list[str]:
        """Every file a run's round r's stages make: deleting any of them reruns it and what depends on it."""
        trained = fill(CHECKPOINT, run=run, round=r)
        if not self.runs[run].clusters:  # RotNet: the training block alone
            return [trained]
        one = {"run": run, "round": r}
        return [*self.shard_files(run, r, images), fill(PCA, **one), fill(SUPER, **one),
                *self.sub_cluster_files(run, r), fill(LABELS, **one), trained]  # fmt: skip

    def round_benchmarks(self, r: int, images: int) -> dict[str, list[str]]:
        """The benchmark files of each stage of the main run's round r (the summary's stage times)."""
        jobs = {"train": [fill(CHECKPOINT, run=MAIN, round=r)]}
        if self.method.clusters:
            jobs = {"features": self.shard_files(MAIN, r, images), "pca": [fill(PCA, run=MAIN, round=r)],
                    "super_clusters": [fill(SUPER, run=MAIN, round=r)],
                    "sub_clusters": self.sub_cluster_files(MAIN, r), "labels": [fill(LABELS, run=MAIN, round=r)],
                    **jobs}  # fmt: skip
        return {stage: [benchmark_file(path) for path in paths] for stage, paths in jobs.items()}

    def figures(self, r: int | str = "{round}") -> dict[str, str]:
        """The report's figures of the main run's round r, by name."""
        names = list(ROUND_FIGURES) if self.method.clusters else ["training"]
        return {name: fill(FIGURE, round=r, figure=ROUND_FIGURES[name]) for name in names}

    def checkpoint_file(self, run: str, name: str) -> str:
        """round-{r}: that round's checkpoint of the run; a registered name: its checked copy."""
        if name.startswith("round-"):
            return self.checkpoint(run, int(name.removeprefix("round-")))
        return fill(IMPORTED, name=name)

    @staticmethod
    def eval_folder(run: str, name: str) -> str:
        """Where a checkpoint's evaluations are: round 0's are the main run's, as its checkpoint."""
        return fill(EVAL, run=MAIN if name == "round-0" else run, name=name)

    def compared(self) -> dict[str, tuple[str, str]]:
        """The table's rows in the paper's order, as {row: (run, name)}: the checkpoint named under
        evaluation.compare, else the random init (round 0) and each method's last round: the main run's for
        the config's method, a run of its own under results/compare/{method} for the others."""
        named = self.config["evaluation"]["compare"]
        rows = {"random": (MAIN, "round-0")} | {m.name: (run, f"round-{self.rounds}") for run, m in self.runs.items()}
        return {row: (MAIN, named[row]) if named[row] else rows[row] for row in ROW_ORDER}
