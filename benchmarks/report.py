"""The benchmarks' table: rows of ours against a baseline measured in the same run, with a goal, and the tools every
case times and measures with (interleaved best-of timing, a command's peak memory)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
        text = f"within {bound:.1%}" if goal == "within" else f"{goal} {bound:g}"
        self.rows.append(Row(name, sizes, ours, baseline, ratio, text, GOALS[goal](ratio, bound)))

    def figure(self, name: str, value: str) -> None:
        self.figures.append((name, value))


def aligned(lines: list[tuple[str, ...]]) -> list[str]:
    """Table lines of ``lines``' cells, each column as wide as its widest cell, cells joined by " | "."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]


def timed_pair(
    repeats: int,
    ours: Callable[[], object],
    bare: Callable[[], object],
    before: Callable[[], object] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """The best time of each of ``ours`` and ``bare`` (by ``clock``: wall time, or the process's CPU time of work
    on one thread), run alternately ``repeats`` times each (each first in turn: the first run of all warms the
    caches), with ``before`` (untimed) before each run."""
    best = [float("inf"), float("inf")]
    for repeat in range(repeats):
        for i in (0, 1) if repeat % 2 == 0 else (1, 0):
            run = (ours, bare)[i]
            before()
            tick = clock()
            run()
            best[i] = min(best[i], clock() - tick)
    return best[0], best[1]


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
