"""``python -m benchmarks [--quick] [--slurm] [--only NAME ...]``: the table of ratios, then the measured throughputs.

``python -m benchmarks --gpu [--device cuda|cpu] [--tiny] [--only CHECK ...]``: the GPU checks instead
(``benchmarks.gpu``; docs/slurm.md, "GPU nodes"). Run from the repository root (or ``benchmarks/run``); the
package is imported from ``workflow/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Sizes: small but past the caches, so the whole run takes about 10 minutes on 2 cores; --quick about 1.
FULL = {
    "kmeans": {"rows": 200_000, "dim": 128, "k": 1024, "iterations": 10, "repeats": 3},
    "kmeans_io": {"rows": 200_000, "dim": 256, "m": 4, "k": 256, "repeats": 3},
    "sub_memory": {"rows": 10_000, "dim": 1024, "k": 8192},
    "images": 3000,
    "features": {"batch_size": 256, "repeats": 5},
    "features_memory": {"rows": 1_000_000, "shard_size": 256},
    "training": {"batch_size": 64, "repeats": 5},
    "training_memory": {"rows": 250_000},
    "io": {"rows": 200_000, "dim": 256, "repeats": 6},
    "memory": {"rows": 100_000, "dim": 256, "k": 64},
    # The paper's layout: one rank's part of its group's W_g (k = 80,000 over p = 4 ranks), 48 images per GPU.
    "head": {"k": 80_000, "dim": 4096, "batch": 48, "parts": 4},
    "manifest": {"rows": 250_000, "per_tar": 5_000},
    # The photos: 600 web-sized, 100 camera-sized.
    "jpeg": {"small": 600, "camera": 100, "batch_size": 50, "repeats": 5},
}
QUICK = {
    "kmeans": {"rows": 20_000, "dim": 64, "k": 100, "iterations": 5, "repeats": 1},
    "kmeans_io": {"rows": 20_000, "dim": 64, "m": 4, "k": 50, "repeats": 1},
    "sub_memory": {"rows": 5_000, "dim": 256, "k": 2048},
    "images": 300,
    "features": {"batch_size": 100, "repeats": 1},
    "features_memory": {"rows": 25_000, "shard_size": 100},
    "training": {"batch_size": 32, "repeats": 1},
    "training_memory": {"rows": 25_000},
    "io": {"rows": 20_000, "dim": 128, "repeats": 2},
    "memory": {"rows": 20_000, "dim": 64, "k": 16},
    "head": {"k": 8_000, "dim": 4096, "batch": 48, "parts": 4},
    "manifest": {"rows": 4_000, "per_tar": 500},
    "jpeg": {"small": 16, "camera": 16, "batch_size": 4, "repeats": 1},
}
CASES = ("kmeans", "features", "training", "jpeg", "io", "memory", "head", "manifest", "workflow")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="also measure the workflow overhead on the SLURM cluster of $SLURM_CONF (tests/slurm/cluster.sh start)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"run only these benchmarks: {', '.join(CASES)} (with --gpu: checks of benchmarks.gpu.CHECKS)",
    )
    parser.add_argument("--gpu", action="store_true", help="the GPU checks (benchmarks.gpu) instead: about 7 minutes")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="with --gpu: where the checks run")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: toy sizes, every check's code in a minute")
    args = parser.parse_args(argv)
    if (args.device != "cuda" or args.tiny) and not args.gpu:
        parser.error("--device and --tiny go with --gpu")
    return args


def only(names: list[str] | None, valid: list[str]) -> list[str]:
    """``--only``'s names (all when none), each one of ``valid``."""
    unknown = sorted(set(names or []) - set(valid))
    if unknown:
        sys.exit(f"--only: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names or valid


def prepare_environment() -> None:
    """The package from this checkout, in this process and its children; quiet progress bars."""
    sys.path.insert(0, str(REPO / "workflow"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "workflow"), str(REPO), os.environ.get("PYTHONPATH")])
    )
    import deepercluster  # noqa: F401  its process defaults (OpenMP's passive wait, no huge pages), as the CLI's

    os.environ.setdefault("TQDM_DISABLE", "1")


def run(args: argparse.Namespace, work: Path):  # -> Report
    from benchmarks import jpeg, kmeans, manifests, network, workflow
    from benchmarks.inputs import image_round
    from benchmarks.report import Report

    sizes, report = QUICK if args.quick else FULL, Report()
    if args.slurm and not os.environ.get("SLURM_CONF"):
        sys.exit('--slurm needs a running cluster: eval "$(tests/slurm/cluster.sh start)" sets SLURM_CONF')
    if "kmeans" in args.only:
        kmeans.kmeans_case(report, work, **sizes["kmeans"])
        kmeans.kmeans_io_case(report, work, **sizes["kmeans_io"])
        kmeans.sub_memory_case(report, work, **sizes["sub_memory"])
    if {"features", "training"} & set(args.only):
        images = image_round(work / "images", sizes["images"])
        if "features" in args.only:
            network.features_case(report, images, work, **sizes["features"])
            network.features_memory_case(report, images, work, **sizes["features_memory"])
        if "training" in args.only:
            network.training_case(report, images, work, **sizes["training"])
            network.training_memory_case(report, work, **sizes["training_memory"])
    if "jpeg" in args.only:
        jpeg.jpeg_case(report, work, **sizes["jpeg"])
    if "io" in args.only:
        kmeans.shard_io_case(report, work, **sizes["io"])
    if "memory" in args.only:
        kmeans.memory_case(report, work, **sizes["memory"])
    if "head" in args.only:
        network.head_memory_case(report, **sizes["head"])
    if "manifest" in args.only:
        manifests.manifest_case(report, work, **sizes["manifest"])
        manifests.tar_read_case(report, work, sizes["manifest"]["rows"])
    if "workflow" in args.only:
        workflow.workflow_case(report, work, args.quick, slurm=False)
        if args.slurm:
            workflow.workflow_case(report, work, args.quick, slurm=True)
    return report


def print_table(report, seconds: float, quick: bool) -> None:
    from benchmarks.report import aligned

    header = ("benchmark", "sizes", "ours", "baseline", "ratio", "goal", "result")
    lines = [
        header,
        *(
            (r.name, r.sizes, r.ours, r.baseline, f"{r.ratio:.3f}", r.goal, "pass" if r.passed else "FAIL")
            for r in report.rows
        ),
    ]
    print("\n".join(aligned(lines)))
    print(f"\nmeasured throughputs (CPU, {os.cpu_count()} cores; docs/scale.md scales them):")
    for name, value in report.figures:
        print(f"  {name}: {value}")
    print(
        f"\n{'quick' if quick else 'full'} run: {seconds:.0f} s; "
        f"{sum(not r.passed for r in report.rows)} of {len(report.rows)} goals missed"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    prepare_environment()
    if args.gpu:
        from benchmarks import gpu

        return gpu.main(only(args.only, list(gpu.CHECKS)), args.device, args.tiny)
    args.only = only(args.only, list(CASES))
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepercluster-bench-") as work:
        report = run(args, Path(work))
    print_table(report, time.perf_counter() - tick, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
