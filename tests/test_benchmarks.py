"""The benchmark command's smoke run: ``python -m benchmarks --quick`` prints every benchmark with a ratio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = [
    "k-means time, 1 rank",
    "k-means objective",
    "k-means time, 2 ranks (gloo)",
    "features throughput",
    "training throughput",
    "shard write throughput",
    "shard read throughput",
    "PCA peak RSS, 4N vs N",
    "k-means peak RSS, 4N vs N",
    "sub-class head memory (one rank)",
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
        ratio = float(row[4])  # a number, not a placeholder
        assert 0 < ratio < 1e3, row
        assert row[6].strip() in ("pass", "FAIL"), row
    assert "k-means, per row x centroid x dim" in run.stdout
