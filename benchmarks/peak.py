"""``python -m benchmarks.peak OUT -m MODULE ARGS...`` or ``OUT -c CODE``: run it, write its peak RSS (MB) to OUT.

The peak is this process's own high-water mark (VmHWM), which starts afresh at exec; the
rusage of a child would include its forking parent's memory, since Linux carries the
high-water mark across fork and exec.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def high_water_mb() -> float:
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / 1e6


def reset_high_water() -> None:
    """Start this process's high-water mark afresh from its resident memory now (Linux's clear_refs), so the peak
    read at exit is that of what runs after: the imports before it left out."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    out, kind, target, *args = sys.argv[1:]
    sys.argv = [target, *args]
    try:
        if kind == "-m":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
    finally:
        Path(out).write_text(f"{high_water_mb()}\n")


if __name__ == "__main__":
    main()
