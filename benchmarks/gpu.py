"""``python -m benchmarks --gpu [--device cuda|cpu] [--tiny] [--only CHECK ...]``: every GPU path in one command.

The checks (docs/slurm.md, "GPU nodes"): k-means with faiss on the GPU against raw ``faiss.Kmeans(gpu=True)``, and
a larger case next to the paper's sub-level iteration; a training block of VGG-16-BN at 224 px against a bare CUDA
step loop (images/s, peak GPU memory); 2 ranks sharing the GPU against 1 rank (the same weights); extraction
against a bare forward loop; a demo round end to end. Each check runs in a process of its own under its own time
limit (together 7 minutes), prints its rows or its error, and the next one starts. The table is printed and
written to ``results/gpu-check/table.txt``, each check's log beside it. ``--device cpu --tiny`` runs every check's
code at toy sizes on the CPU (tests/test_gpu_check.py), so what only a GPU can test is CUDA itself.

A check's process: ``python -m benchmarks.gpu CHECK gpu|tiny cuda|cpu RESULT.json WORK_FOLDER``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
import yaml

from benchmarks.inputs import Rows, image_round
from benchmarks.kmeans import kmeans_pair, on_ranks
from benchmarks.network import bare_training, block_settings, features_case
from benchmarks.report import MB, REPO, Report, Row, aligned
from benchmarks.workflow import snakemake
from deepercluster.checkpoints import load_checkpoint
from deepercluster.cluster.kmeans import assign, initial_centroids
from deepercluster.config import validate_config
from deepercluster.evaluate.backbone import device
from deepercluster.formats.manifest import read_manifest
from deepercluster.plan import CHECKPOINT, MAIN, MANIFEST, Plan, benchmark_file, fill
from deepercluster.train.block import train_block

OUT = Path("results") / "gpu-check"
CPU_LIMIT_S = 1800  # the limits are the GPU run's; on the CPU one only guards against a hang
DEMO_BASELINE = REPO / "benchmarks" / "demo-round-2-cores.tsv"
# The paper's sub-level k-means iteration: 96M images / m = 4 super-clusters / 16 GPUs each, k = 80,000, D = 4096.
PAPER_SUB_LEVEL = {"rows": 96_000_000 // 4 // 16, "k": 80_000, "dim": 4096, "seconds": 240}

SIZES = yaml.safe_load((REPO / "benchmarks" / "gpu-sizes.yaml").read_text())  # "gpu" and "tiny"


class SavedReport(Report):
    """A check's rows and figures, saved to ``path`` as each comes, so a check stopped at its limit keeps those."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.error = path, None
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
        self.save()

    def add(self, *args, **kwargs) -> None:
        super().add(*args, **kwargs)
        self.save()

    def figure(self, name: str, value: str) -> None:
        super().figure(name, value)
        self.save()

    def fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self.save()

    def save(self) -> None:
        state = {
            "rows": [asdict(r) for r in self.rows],
            "figures": self.figures,
            "error": self.error,
            "device": self.device,
        }
        self.path.write_text(json.dumps(state))


def peak_memory(run: Callable[[], object]) -> float | None:
    """The most GPU memory (MB) ``run()`` allocated beyond what was allocated before it; None on the CPU."""
    if not torch.cuda.is_available():
        run()
        return None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def kmeans_check(report: Report, work: Path, **sizes: int) -> None:
    """Our k-means (the super_clusters stage) against faiss.Kmeans on the GPU, the same rows and initial centroids."""
    kmeans_pair(report, work, **sizes, gpu=torch.cuda.is_available())


def mixture_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """``rows`` float32 rows of a 64-centre Gaussian mixture (``synthetic_shards``' distribution), drawn on the
    device: seconds where numpy takes minutes."""
    generator = torch.Generator(device()).manual_seed(seed)
    centres = torch.randn(64, dim, generator=generator, device=device())
    picks = torch.randint(0, 64, (rows,), generator=generator, device=device())
    x = centres[picks].add_(torch.randn(rows, dim, generator=generator, device=device()), alpha=0.5).cpu().numpy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the draws' memory back to the other checks' use
    return x


def kmeans_large_check(report: Report, work: Path, rows: int, dim: int, k: int, passes: int) -> None:
    """One k-means iteration (an assignment pass, ``kmeans.assign``) at a larger size, best of ``passes``, scaled
    to the paper's sub-level iteration per GPU by its row x centroid x dim count (the same GEMM)."""
    source = Rows(mixture_rows(rows, dim))
    centroids = initial_centroids(source, k, seed=0)
    seconds = []
    for _ in range(passes):
        tick = time.perf_counter()
        assign(source, centroids)
        seconds.append(time.perf_counter() - tick)
    per_unit = min(seconds) / (rows * k * dim)
    paper = PAPER_SUB_LEVEL
    predicted = per_unit * paper["rows"] * paper["k"] * paper["dim"]
    report.add(
        "k-means iteration, the paper's sub-level on one device",
        f"measured at N={rows}, d={dim}, k={k} ({min(seconds):.2f} s), scaled",
        f"{predicted:.0f} s",
        f"{paper['seconds']} s (paper: {paper['rows']} rows per GPU, k={paper['k']}, D={paper['dim']})",
        predicted / paper["seconds"],
        "<=",
        1.0,
    )
    report.figure("k-means, per row x centroid x dim, one iteration (ours)", f"{per_unit:.3g} s")


def training_check(
    report: Report, work: Path, images: int, arch: str, image_size: int, batch_size: int, workers: int
) -> None:
    """The training block against a bare step loop on the same model, heads, batches and DataLoader: images/s of
    the steps (the median step: the block's loading and saving are a figure of their own) and peak GPU memory."""
    inputs = image_round(work / "images", images, arch)
    folder = work / "train"
    settings = block_settings(workers, epochs=1, batch_size=batch_size, image_size=image_size)
    tick = time.perf_counter()
    ours_mb = peak_memory(
        lambda: train_block(
            manifest=inputs.manifest,
            previous_checkpoint=inputs.checkpoint,
            out=str(folder / "out.pt"),
            train_dir=str(folder),
            method="deepercluster",
            round=1,
            labels=inputs.labels,
            **settings,
        )
    )
    wall, steps = time.perf_counter() - tick, []
    bare_mb = peak_memory(lambda: steps.extend(bare_training(inputs, batch_size, image_size, workers)))
    metrics = pd.read_csv(folder / "metrics.tsv", sep="\t")
    ours, bare = float(metrics["images_per_s"].median()), batch_size / float(np.median(steps))
    sizes = f"{images} images {image_size}px, {arch}, {len(metrics)} steps of {batch_size}, {workers} workers"
    report.add(
        "training throughput (median step)",
        sizes,
        f"{ours:.0f} img/s",
        f"{bare:.0f} img/s (torch)",
        ours / bare,
        ">=",
        0.9,
    )
    if ours_mb is not None:
        report.add(
            "training peak GPU memory",
            sizes,
            f"{ours_mb:.0f} MB",
            f"{bare_mb:.0f} MB (torch)",
            ours_mb / bare_mb,
            "<=",
            1.1,
        )
    report.figure(f"training block, {len(metrics)} steps, wall (loading and saves included)", f"{wall:.1f} s")


def exact_block(**block: object) -> None:
    """``train_block`` in float32 throughout (no TF32 convolutions or matrix products), so weights compare exactly."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    train_block(**block)


def farthest(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], rtol: float, atol: float) -> float:
    """The largest |two - one| / (atol + rtol |one|) over every float weight: at most 1 is torch.testing's close."""
    return max(
        float(((two[key] - value).abs() / (atol + rtol * value.abs())).max())
        for key, value in one.items()
        if value.is_floating_point()
    )


def ranks_check(report: Report, work: Path, images: int, arch: str, image_size: int, batch_size: int) -> None:
    """A block on 2 ranks sharing the device against 1 rank on the same global batch (dropout off, the one draw
    that depends on the rank): the same weights to float32 tolerance. NCCL needs a GPU per rank, so ranks sharing
    one GPU use gloo on its CUDA tensors."""
    inputs = image_round(work / "images", images, arch)
    block = {
        "manifest": inputs.manifest,
        "previous_checkpoint": inputs.checkpoint,
        "labels": inputs.labels,
        "method": "deepercluster",
        "round": 1,
        **block_settings(epochs=1, batch_size=batch_size, image_size=image_size, dropout=0.0),
    }
    runs = {ranks: work / f"{ranks}-ranks" for ranks in (1, 2)}
    tick = time.perf_counter()
    exact_block(**block, out=str(runs[1] / "out.pt"), train_dir=str(runs[1]))
    one_s = time.perf_counter() - tick
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    two_s = on_ranks(
        2, exact_block, {**block, "out": str(runs[2] / "out.pt"), "train_dir": str(runs[2])}, work, backend
    )
    one, two = (load_checkpoint(folder / "out.pt")["model"] for folder in runs.values())
    steps = len(pd.read_csv(runs[1] / "metrics.tsv", sep="\t"))
    sizes = f"{arch} {image_size}px, {steps} steps of {batch_size}, dropout 0, {backend}"
    worst = max(float((two[key] - value).abs().max()) for key, value in one.items() if value.is_floating_point())
    report.add(
        "2 ranks on one device vs 1 rank: weights",
        sizes,
        f"max |w2 - w1| {worst:.2g}",
        "1e-5 + 1e-5 |w1|",
        farthest(one, two, rtol=1e-5, atol=1e-5),
        "<=",
        1.0,
    )
    report.figure(f"block of {steps} steps, 2 ranks ({backend}) / 1 rank, time", f"{two_s:.1f} s / {one_s:.1f} s")


def extraction_check(report: Report, work: Path, images: int, arch: str, repeats: int, **settings: int) -> None:
    """The features stage against a bare forward loop on the same DataLoader."""
    features_case(report, image_round(work / "images", images, arch), work, repeats=repeats, bound=0.9, **settings)


def demo_check(report: Report, work: Path, config: str, cores: int, images: int | None) -> None:
    """Round 1 of ``config`` (DeeperCluster from the random init; on ``images`` images, if given), end to end with
    Snakemake on ``cores`` cores (at most this machine's): each stage's in-job time from its benchmark files, and
    the wall time, against the same on the project's 2-core machine (``DEMO_BASELINE``, where recorded)."""
    settings = yaml.safe_load((REPO / config).read_text())
    settings["methods"]["deepercluster"]["init"] = "random"
    settings["data"]["max_images"] = images or settings["data"]["max_images"]
    cores, folder = min(cores, os.cpu_count() or 1), work / "demo"
    wall = snakemake(folder, settings, ["--cores", str(cores)], [fill(CHECKPOINT, run=MAIN, round=1)])
    count = len(read_manifest(str(folder / MANIFEST)))
    jobs = {
        "manifest": [benchmark_file(MANIFEST)],
        "init": [benchmark_file(fill(CHECKPOINT, run=MAIN, round=0))],
        **Plan(validate_config(settings)).round_benchmarks(1, count),
    }
    rows = [
        (stage, len(files), sum(float(pd.read_csv(folder / f, sep="\t")["s"].sum()) for f in files))
        for stage, files in jobs.items()
    ]
    rows.append(("wall", sum(n for _, n, _ in rows), wall))
    table = pd.DataFrame(
        [(config, count, cores, *row) for row in rows],
        columns=["config", "images", "cores", "stage", "jobs", "seconds"],
    )
    table.to_csv(report.path.with_name("demo-round.tsv"), sep="\t", index=False, float_format="%.1f")  # as recorded
    recorded = pd.read_csv(DEMO_BASELINE, sep="\t", comment="#")
    recorded = recorded[(recorded["config"] == config) & (recorded["images"] == count)].set_index("stage")
    for stage, n, seconds in rows:
        name, sizes = f"demo round 1: {stage}", f"{config}, {count} images, {n} jobs, --cores {cores}"
        if stage in recorded.index:
            baseline = float(recorded.loc[stage, "seconds"])
            report.add(name, sizes, f"{seconds:.1f} s", f"{baseline:.1f} s (2 cores)", seconds / baseline, "<=", 1.0)
        else:
            report.figure(f"{name} ({sizes})", f"{seconds:.1f} s")


@dataclass(frozen=True)
class Check:
    run: Callable[..., None]
    limit_s: int  # the limits add up to 7 minutes
    faiss_gpu: bool = False  # needs faiss's GPU build on a GPU


CHECKS = {
    "kmeans": Check(kmeans_check, 90, faiss_gpu=True),
    "kmeans-large": Check(kmeans_large_check, 50, faiss_gpu=True),
    "training": Check(training_check, 70),
    "ranks": Check(ranks_check, 60),
    "extraction": Check(extraction_check, 45),
    "demo": Check(demo_check, 105),
}


def check_process(name: str, kind: str, wanted: str, result: Path, work: Path) -> int:
    """One check in this process, in the folder ``work``, its rows saved to ``result`` as they come, or its error."""
    report = SavedReport(result)
    try:
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: run on a GPU node, or with --device cpu")
        if wanted == "cuda" and CHECKS[name].faiss_gpu and faiss.get_num_gpus() == 0:
            raise RuntimeError("faiss sees no GPU (faiss-cpu is installed): bash envs/install.sh --gpu")
        CHECKS[name].run(report, work, **SIZES[kind][name])
    except Exception as error:
        traceback.print_exc()
        report.fail(error)
        return 1
    return 0


@dataclass
class Outcome:
    name: str
    seconds: float
    rows: list[Row]
    figures: list[tuple[str, str]]
    error: str | None
    device: str | None


def run_check(name: str, kind: str, wanted: str, env: dict[str, str]) -> Outcome:
    """A check in a process (and process group) of its own, killed with its children at its time limit."""
    result, limit = OUT / f"{name}.json", CHECKS[name].limit_s if wanted == "cuda" else CPU_LIMIT_S
    result.unlink(missing_ok=True)
    tick, error = time.perf_counter(), None
    with (OUT / f"{name}.log").open("w") as log, tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as work:
        command = [sys.executable, "-m", "benchmarks.gpu", name, kind, wanted, str(result), work]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code, error = process.wait(), f"timed out after its {limit} s limit"
    state = json.loads(result.read_text()) if result.exists() else {"rows": [], "figures": [], "device": None}
    error = error or state.get("error") or (f"exited with code {code}" if code else None)
    rows = [Row(**row) for row in state["rows"]]
    return Outcome(name, time.perf_counter() - tick, rows, [tuple(f) for f in state["figures"]], error, state["device"])


def table(outcomes: list[Outcome], heading: str) -> str:
    """One table: each check's rows (ratio and goal), then its figures, or its error."""
    lines = [("check", "benchmark", "sizes", "ours", "baseline", "ratio", "goal", "result")]
    for o in outcomes:
        lines += [
            (o.name, r.name, r.sizes, r.ours, r.baseline, f"{r.ratio:.3g}", r.goal, "pass" if r.passed else "FAIL")
            for r in o.rows
        ]
        lines += [(o.name, figure, "", value, "", "", "", "figure") for figure, value in o.figures]
        if o.error:
            lines.append((o.name, f"(after {o.seconds:.0f} s)", "", o.error, "", "", "", "error"))
    return "\n".join([heading, "", *aligned(lines)]) + "\n"


def main(only: list[str], wanted: str, tiny: bool) -> int:
    """Every check in ``only`` (in the table's order), then the table, printed and written to ``OUT``."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if wanted == "cpu" else {})}
    kind, outcomes, tick = "tiny" if tiny else "gpu", [], time.perf_counter()
    for name in [name for name in CHECKS if name in only]:
        outcomes.append(run_check(name, kind, wanted, env))
        o = outcomes[-1]
        said = o.error or f"{len(o.rows)} rows, {len(o.figures)} figures"
        print(f"[{name}] {o.seconds:.0f} s: {said} (log: {OUT / (name + '.log')})", flush=True)
    devices = sorted({o.device for o in outcomes if o.device})
    heading = (
        f"GPU check, {kind} sizes, --device {wanted}: {', '.join(devices) or 'device unknown'}, "
        f"{os.cpu_count()} cores, {time.perf_counter() - tick:.0f} s"
    )
    text = table(outcomes, heading)
    print("\n" + text)
    (OUT / "table.txt").write_text(text)
    print(f"written to {OUT / 'table.txt'}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    from benchmarks import gpu  # the functions by their module's name, as the ranks' processes unpickle them

    sys.exit(gpu.check_process(*sys.argv[1:4], Path(sys.argv[4]), Path(sys.argv[5])))
