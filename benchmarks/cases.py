"""The benchmarks: each runs a package stage and its bare baseline on the same inputs, side by side.

Each case appends table rows (ours, baseline, their ratio, the goal) and the throughputs that
``docs/scale.md`` scales up to a ``Report``. Times are the best of ``repeats`` interleaved runs,
so a burst of other work on the machine slows one run, not the figure.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import h5py
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from benchmarks.inputs import DEFAULTS, IMAGE_SIZE, ImageRound, synthetic_checkpoint, synthetic_shards, whitening_file
from deepercluster.checkpoints import load_model
from deepercluster.cluster.kmeans import initial_centroids
from deepercluster.cluster.levels import cluster_super, level_seed
from deepercluster.cluster.rows import ShardSource
from deepercluster.data.images import ImageDataset, feature_transform, train_transform
from deepercluster.distributed import init_distributed
from deepercluster.features import extract_features
from deepercluster.formats.features import read_chunks, write_shard
from deepercluster.formats.labels import read_labels
from deepercluster.formats.whitening import Whitening
from deepercluster.methods import METHODS
from deepercluster.nn.heads import Heads, linear_head, targets_for
from deepercluster.train.block import train_block

REPO = Path(__file__).resolve().parents[1]
MB = 1e6

# A goal is a comparison of the ratio with a bound.
GOALS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda ratio, bound: ratio <= bound,
    ">=": lambda ratio, bound: ratio >= bound,
    "within": lambda ratio, bound: abs(ratio - 1) <= bound,
}


@dataclass(frozen=True)
class Row:
    name: str
    sizes: str
    ours: str
    baseline: str
    ratio: float
    goal: str
    passed: bool


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (throughput, its value and unit)

    def add(self, name: str, sizes: str, ours: str, baseline: str, ratio: float, goal: str, bound: float) -> None:
        text = f"within {bound:.0%}" if goal == "within" else f"{goal} {bound:g}"
        self.rows.append(Row(name, sizes, ours, baseline, ratio, text, GOALS[goal](ratio, bound)))

    def figure(self, name: str, value: str) -> None:
        self.figures.append((name, value))


def timed_pair(
    repeats: int, ours: Callable[[], object], bare: Callable[[], object], before: Callable[[], object] = lambda: None
) -> tuple[float, float]:
    """The best wall time of each of ``ours`` and ``bare``, run alternately ``repeats`` times each (each first
    in turn: the first run of all warms the caches), with ``before`` (untimed) before each run."""
    best = [float("inf"), float("inf")]
    for repeat in range(repeats):
        for i in (0, 1) if repeat % 2 == 0 else (1, 0):
            run = (ours, bare)[i]
            before()
            tick = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - tick)
    return best[0], best[1]


def read_whitened(shards: list[str], whitening: Whitening) -> np.ndarray:
    """Every row of ``shards``, read with h5py and whitened with numpy: the bare way to faiss's input."""
    parts = []
    for path in shards:
        with h5py.File(path, "r") as f:
            parts.append(f["features"][:])
    return whitening(np.concatenate(parts))


def kmeans_case(report: Report, work: Path, rows: int, dim: int, k: int, iterations: int, repeats: int) -> None:
    """The super_clusters stage (1 rank; then 2 gloo ranks) against faiss.Kmeans from the same shards and centroids."""
    shards = synthetic_shards(work / "kmeans", rows, dim, shard_rows=-(-rows // 2))
    pca = whitening_file(shards, work / "kmeans" / "pca.h5", sample_size=rows)
    whitening, seed, out = Whitening.load(pca), 0, work / "kmeans" / "super.h5"
    start = initial_centroids(ShardSource(shards, whitening, whitening.dim), k, level_seed(seed, None))
    stage = {"shards": shards, "pca": pca, "out": str(out), "super_clusters": k, "iterations": iterations, "seed": seed,
             "cache_mb": DEFAULTS["kmeans"]["cache_mb"]}  # fmt: skip
    faiss_objective = []

    def bare() -> None:
        x = read_whitened(shards, whitening)
        km = faiss.Kmeans(dim, k, niter=iterations, seed=seed, max_points_per_centroid=rows, min_points_per_centroid=1)
        km.train(x, init_centroids=start)
        faiss_objective.append(float(km.index.search(x, 1)[0].sum()))  # the final assignment, as the stage's

    ours_s, bare_s = timed_pair(repeats, lambda: cluster_super(**stage), bare)
    with h5py.File(out, "r") as f:
        objective = float(f["objective"][-1])
    sizes = f"N={rows}, d={dim}, k={k}, {iterations} iterations"
    report.add("k-means time, 1 rank", sizes, f"{ours_s:.2f} s", f"{bare_s:.2f} s (faiss)", ours_s / bare_s, "<=", 1.1)
    report.add(
        "k-means objective",
        sizes,
        f"{objective:.5g}",
        f"{faiss_objective[-1]:.5g} (faiss)",
        objective / faiss_objective[-1],
        "within",
        0.01,
    )
    passes = (iterations + 1) * rows * k * dim
    report.figure("k-means, per row x centroid x dim, whole stage (ours)", f"{ours_s / passes:.3g} s")
    report.figure("k-means, per row x centroid x dim (faiss)", f"{bare_s / passes:.3g} s")

    two_s = two_ranks(stage, work)
    report.add(
        "k-means time, 2 ranks (gloo)",
        sizes + ", 1 thread per rank",
        f"{two_s:.2f} s",
        f"{bare_s:.2f} s (faiss, 2 threads)",
        two_s / bare_s,
        "<=",
        1.1,
    )


def _rank(rank: int, world_size: int, port: int, stage: dict, times: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    init_distributed()
    dist.barrier()
    tick = time.perf_counter()
    cluster_super(**stage)
    dist.barrier()
    if rank == 0:
        Path(times).write_text(str(time.perf_counter() - tick))
    dist.destroy_process_group()


def two_ranks(stage: dict, work: Path) -> float:
    """The stage's in-job time on 2 gloo ranks, started as torchrun would (env://), from the process group on."""
    times = work / "kmeans" / "two-ranks.txt"
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(
        _rank, args=(2, port, {**stage, "out": str(work / "kmeans" / "super-2.h5")}, str(times)), nprocs=2
    )
    return float(times.read_text())


def features_case(report: Report, images: ImageRound, work: Path, batch_size: int, repeats: int) -> None:
    """The features stage against a bare torch forward loop over the same DataLoader."""
    n = len(images.paths)

    def ours() -> None:
        extract_features(
            manifest=images.manifest,
            checkpoint=images.checkpoint,
            shard=0,
            shard_size=n,
            image_size=IMAGE_SIZE,
            out=str(work / "shard-0.h5"),
            batch_size=batch_size,
            workers=0,
        )

    @torch.no_grad()
    def bare() -> None:
        model, _ = load_model(images.checkpoint)
        model.eval()
        dataset = ImageDataset(images.paths, images.ids, feature_transform(IMAGE_SIZE))
        np.concatenate([model(x).numpy() for x, _ in DataLoader(dataset, batch_size=batch_size)])

    ours_s, bare_s = timed_pair(repeats, ours, bare)
    sizes = f"{n} images {IMAGE_SIZE}px, small_convnet, batch {batch_size}"
    report.add(
        "features throughput",
        sizes,
        f"{n / ours_s:.0f} img/s",
        f"{n / bare_s:.0f} img/s (torch)",
        bare_s / ours_s,
        ">=",
        0.85,
    )
    report.figure(f"extraction, small_convnet {IMAGE_SIZE}px, CPU", f"{n / ours_s:.0f} img/s")


def training_case(report: Report, images: ImageRound, work: Path, batch_size: int, repeats: int) -> None:
    """One epoch of the training block against a bare SGD loop: same model, heads, batch size and images."""
    n, runs = len(images.paths), itertools.count()
    iterations = n // batch_size

    def ours() -> None:
        folder = work / f"train-{next(runs)}"  # a fresh folder: nothing to resume
        train_block(
            manifest=images.manifest,
            previous_checkpoint=images.checkpoint,
            out=str(folder / "out.pt"),
            train_dir=str(folder),
            method="deepercluster",
            round=1,
            labels=images.labels,
            **{**block_settings(), "epochs": 1, "batch_size": batch_size, "image_size": IMAGE_SIZE},
        )

    ours_s, bare_s = timed_pair(repeats, ours, lambda: bare_training(images, batch_size))
    sizes = f"{n} images, small_convnet, {iterations} steps of {batch_size}, heads 8 + 8x5"
    report.add(
        "training throughput",
        sizes,
        f"{iterations * batch_size / ours_s:.0f} img/s",
        f"{iterations * batch_size / bare_s:.0f} img/s (torch)",
        bare_s / ours_s,
        ">=",
        0.9,
    )
    report.figure(
        f"training step, small_convnet {IMAGE_SIZE}px, batch {batch_size}, CPU", f"{ours_s / iterations:.3f} s"
    )


def bare_training(images: ImageRound, batch_size: int) -> None:
    """The plain loop: shuffled DataLoader, random rotations, forward, both heads' loss, backward, SGD step."""
    model, _ = load_model(images.checkpoint)
    labels = read_labels(images.labels)
    table = labels.table.set_index("id").loc[images.ids]
    supers, subs = (torch.tensor(table[c].to_numpy(np.int64)) for c in ("super_cluster", "sub_cluster"))
    method = METHODS["deepercluster"]
    targets = targets_for(method, labels.sub_clusters)
    torch.manual_seed(0)
    heads = Heads(model.feature_dim, targets)
    model.train()
    heads.train()
    optimizer = torch.optim.SGD([*model.parameters(), *heads.parameters()], lr=0.05, momentum=0.9, weight_decay=1e-5)
    dataset = ImageDataset(images.paths, range(len(images.paths)), train_transform(IMAGE_SIZE))
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    for x, index in loader:
        rotation = torch.randint(0, 4, (len(x),))
        x = torch.stack([torch.rot90(image, int(r), dims=(1, 2)) for image, r in zip(x, rotation, strict=True)])
        losses = heads(model(x), method.super_class(supers[index], rotation), subs[index])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()


def shard_io_case(report: Report, work: Path, rows: int, dim: int, repeats: int) -> None:
    """Writing and reading a feature shard (formats) against np.save / np.load of the same arrays (page cache).

    Each write makes a new file, as a stage does.
    """
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    ids = np.arange(rows, dtype=np.int64)
    shard, arrays = work / "io" / "shard.h5", [work / "io" / "features.npy", work / "io" / "ids.npy"]
    shard.parent.mkdir(parents=True, exist_ok=True)
    size = (x.nbytes + ids.nbytes) / MB

    def bare_write() -> None:
        for path, array in zip(arrays, (x, ids), strict=True):
            np.save(path, array)

    def delete() -> None:  # each write makes a new file, as a stage does
        for path in (shard, *arrays):
            path.unlink(missing_ok=True)

    def ours_read() -> None:
        for _ in read_chunks([str(shard)]):
            pass  # as the stages read: chunk by chunk

    write = timed_pair(repeats, lambda: write_shard(shard, x, ids), bare_write, before=delete)
    write_shard(shard, x, ids)  # both files again: each write's ``delete`` removed the other's
    bare_write()
    read = timed_pair(repeats, ours_read, lambda: [np.load(path) for path in arrays])
    sizes = f"{rows} x {dim} float32 + ids ({size:.0f} MB)"
    for name, (ours_s, bare_s) in (("shard write", write), ("shard read", read)):
        report.add(
            f"{name} throughput",
            sizes,
            f"{size / ours_s:.0f} MB/s",
            f"{size / bare_s:.0f} MB/s (numpy)",
            bare_s / ours_s,
            ">=",
            0.8,
        )
        report.figure(f"HDF5 {name.split()[1]}, page cache (ours)", f"{size / ours_s:.0f} MB/s")


def peak_rss(command: list[str]) -> float:
    """Peak resident memory (MB) of ``python -m ...`` or ``python -c ...`` (``command`` without the interpreter)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peak"
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak", str(out), *command], capture_output=True, text=True
        )
        if run.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
        return float(out.read_text())


def memory_case(report: Report, work: Path, rows: int, dim: int, k: int) -> None:
    """Peak memory of the PCA and k-means stages at N and 4N rows: flat in N once the rows exceed the cache."""
    stage = ["-m", "deepercluster", "--threads", "2"]
    sample, cache_mb = rows // 4, rows * dim * 4 / MB / 4
    shards = {n: synthetic_shards(work / f"memory-{n}", n, dim, shard_rows=rows // 2) for n in (rows, 4 * rows)}
    pca = whitening_file(shards[rows], work / "memory-pca.h5", sample_size=sample)
    peaks = {}
    for n, paths in shards.items():
        out = str(work / f"memory-{n}")
        floor = str(DEFAULTS["pca"]["eigenvalue_floor"])
        pca_stage = ["pca", "--shards", *paths, "--checkpoint", synthetic_checkpoint(paths), "--out", out + ".pca.h5",
                     "--sample-size", str(sample), "--seed", "0"]  # fmt: skip
        peaks["PCA", n] = peak_rss([*stage, *pca_stage, "--eigenvalue-floor", floor])
        peaks["k-means", n] = peak_rss(
            [
                *stage,
                "super-clusters",
                "--shards",
                *paths,
                "--pca",
                pca,
                "--out",
                out + ".super.h5",
                "--super-clusters",
                str(k),
                "--iterations",
                "2",
                "--seed",
                "0",
                "--cache-mb",
                f"{cache_mb:g}",
            ]
        )
    for name, extra in (("PCA", f", sample {sample}"), ("k-means", f", k={k}, cache {cache_mb:g} MB")):
        small, large = peaks[name, rows], peaks[name, 4 * rows]
        report.add(
            f"{name} peak RSS, 4N vs N",
            f"N={rows}, d={dim} ({rows * dim * 4 / MB:.0f} MB){extra}",
            f"{large:.0f} MB",
            f"{small:.0f} MB",
            large / small,
            "<=",
            1.1,
        )


def head_step(k: int, dim: int, batch: int) -> None:
    """Two SGD steps (momentum, weight decay) of a k-class linear head: a rank's part of its group's W_g."""
    torch.manual_seed(0)
    head = linear_head(dim, k)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    for _ in range(2):
        loss = F.cross_entropy(head(torch.randn(batch, dim)), torch.randint(0, k, (batch,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def head_memory_case(report: Report, k: int, dim: int, batch: int, parts: int) -> None:
    """Peak memory of a step of one rank's part of a group's sub-class head (k / parts classes of W_g) against
    the prediction 4 x 4 bytes x (k d + k) / parts: weights, gradients, momentum and SGD's weight-decay
    temporary (grad + wd w, foreach), in float32; the issue's bound is 2 GiB."""
    rows = -(-k // parts)
    code = "from benchmarks.cases import head_step"
    base = peak_rss(["-c", code])
    step = peak_rss(["-c", f"{code}; head_step({rows}, {dim}, {batch})"])
    predicted = 4 * 4 * (rows * dim + rows) / MB
    report.add(
        "sub-class head memory (one rank)",
        f"k={k} over {parts} ranks, d={dim}, batch {batch}; bound 2 GiB",
        f"{step - base:.0f} MB",
        f"{predicted:.0f} MB (predicted)",
        (step - base) / predicted,
        "<=",
        1.1,
    )
    report.figure("sub-class head step, one rank's part, peak", f"{step - base:.0f} MB (the bound: 2 GiB = 2147 MB)")


def slurm_jobs(folder: Path) -> int:
    """How many SLURM jobs (sbatch calls: a job array counts once) ran in ``folder``, training blocks included."""
    rows = subprocess.run(["sacct", "-n", "-X", "-P", "-S", "now-1days", "-o", "JobID,WorkDir%400"],
                          capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    return len({row.split("|")[0].split("_")[0] for row in rows if row.split("|")[1] == str(folder)})


def workflow_case(report: Report, work: Path, quick: bool, slurm: bool) -> None:
    """Snakemake's wall time against the sum of its jobs' in-job times (their benchmark files), jobs run serially:
    ``--cores 1`` locally; on SLURM the profile's settings (job arrays need several jobs at once), every job taking
    the whole 2-CPU node."""
    config = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    targets = []
    if quick:  # the first two jobs only: manifest (100 images) and init
        config |= {"rounds": 1, "data": {**config["data"], "max_images": 100}}
        targets = ["results/data/manifest.parquet", "results/rounds/0/checkpoint.pt"]
    folder = work / ("workflow-slurm" if slurm else "workflow")
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml"]
    if slurm:
        command += ["--profile", str(REPO / "profiles" / "slurm")]
        command += ["--slurm-init-seconds-before-status-checks", "1"]
    else:
        command += ["--cores", "1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    tick = time.perf_counter()
    run = subprocess.run([*command, *targets], cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if run.returncode:
        raise RuntimeError(f"snakemake failed in {folder}:\n{run.stderr[-3000:]}")
    jobs = list((folder / "results" / "benchmarks").rglob("*.tsv"))
    in_job = sum(float(pd.read_csv(path, sep="\t")["s"].sum()) for path in jobs)
    where = "SLURM" if slurm else "local"
    sizes = f"{config['data']['max_images']} images, {config['rounds']} round(s), {len(jobs)} jobs, 1 at a time"
    if slurm:
        sizes += f" ({slurm_jobs(folder)} SLURM jobs)"
    report.add(
        f"workflow overhead ({where})", sizes, f"{wall:.1f} s wall", f"{in_job:.1f} s in jobs", wall / in_job, "<=", 1.1
    )
    report.figure(f"per-job overhead ({where})", f"{(wall - in_job) / len(jobs):.2f} s")


def block_settings() -> dict:
    """The training block's settings from the schema's defaults (the benchmark sets epochs, batch, image size)."""
    train = DEFAULTS["train"]
    keys = ("lr", "momentum", "weight_decay", "dropout", "min_crop_scale", "checkpoint_every")
    return {**{key: train[key] for key in keys}, "workers": 0, "seed": 0}
