"""The benchmark command's smoke run: ``python -m benchmarks --quick`` prints every benchmark with a ratio."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = [
    "k-means time, 1 rank",
    "k-means objective",
    "k-means float16 vs float32 rows, objective",
    "k-means float16 vs float32 rows, same assignments to float32's centroids",
    "k-means time, 2 ranks (gloo)",
    "k-means bytes read per pass, super level",
    "k-means bytes read per pass, sub level",
    "k-means pass, whitened spill vs re-whitening",
    "k-means sub level peak RSS (one rank), k vs k/2",
    "features throughput",
    "features job peak RSS, 4N vs N",
    "training throughput",
    "training rank peak RSS, 4N vs N",
    "JPEG features path, camera photos",
    "JPEG features path, camera photos, against decoding alone",
    "JPEG training path, camera photos",
    "JPEG training path, camera photos, against decoding alone",
    "JPEG features path, camera photos, NMI of k-means with the source photo",
    "JPEG features path, camera photos, 1-NN top-1 of the source photo",
    "JPEG features path, small photos",
    "JPEG features path, small photos, against decoding alone",
    "JPEG training path, small photos",
    "JPEG training path, small photos, against decoding alone",
    "JPEG features path, small photos, NMI of k-means with the source photo",
    "JPEG features path, small photos, 1-NN top-1 of the source photo",
    "shard write throughput",
    "shard read throughput",
    "PCA peak RSS, 4N vs N",
    "k-means peak RSS, 4N vs N",
    "sub-class head memory (one rank)",
    "manifest peak RSS, 4N vs N (folder)",
    "manifest CPU time per image, 4N vs N (folder)",
    "manifest peak RSS, 4N vs N (tar)",
    "manifest CPU time per image, 4N vs N (tar)",
    "image reads, tar shards vs loose files",
    "workflow overhead (local)",
]


def test_quick_run_prints_every_benchmark_with_a_ratio() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.count(" | ") == 6]
    header, *rows = rows
    assert header[0].strip() == "benchmark" and header[4].strip() == "ratio", run.stdout
    assert [row[0].strip() for row in rows] == BENCHMARKS, run.stdout
    for row in rows:
        ratio = float(row[4])  # a number, not a placeholder (a memory difference at --quick's sizes may be ~0)
        assert math.isfinite(ratio) and abs(ratio) < 1e3, row
        assert row[6].strip() in ("pass", "FAIL"), row
    assert "k-means, per row x centroid x dim" in run.stdout
