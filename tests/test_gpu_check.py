"""The GPU check's every code path, at toy sizes on the CPU: ``python -m benchmarks --gpu --device cpu --tiny``
prints one table where each check gave its figures, none an error, and writes it to results/gpu-check/table.txt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["kmeans", "kmeans-large", "training", "ranks", "extraction", "demo"]


def test_every_check_gives_its_figures_at_toy_sizes_on_the_cpu(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--gpu", "--device", "cpu", "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "results" / "gpu-check" / "table.txt").read_text()
    assert table in run.stdout
    header, *rows = [[cell.strip() for cell in line.split(" | ")] for line in table.splitlines() if " | " in line]
    assert header == ["check", "benchmark", "sizes", "ours", "baseline", "ratio", "goal", "result"]
    assert [row[0] for row in rows if row[7] == "error"] == []
    assert sorted({row[0] for row in rows}, key=CHECKS.index) == CHECKS
    for check in CHECKS:
        assert [row for row in rows if row[0] == check and row[7] in ("pass", "FAIL")], check  # a ratio and goal
    for row in rows:
        assert row[3], row  # every row has its figure
        if row[7] in ("pass", "FAIL"):
            assert 0 < float(row[5]) < 1e9, row
    weights = next(row for row in rows if row[1].startswith("2 ranks on one device vs 1 rank"))
    assert weights[7] == "pass", weights  # 2 gloo ranks train the weights 1 rank does
    objective = next(row for row in rows if row[1] == "k-means objective")
    assert objective[7] == "pass", objective  # our k-means and faiss's from the same initial centroids
