"""Logging and progress for long stages: every stage says what it does while it does it."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


class RankFilter(logging.Filter):
    """Stamp each record with the process-group rank (0 until one is joined)."""

    def filter(self, record: logging.LogRecord) -> bool:
        dist = sys.modules.get("torch.distributed")  # never imported here: only asked if already loaded
        record.rank = dist.get_rank() if dist is not None and dist.is_initialized() else 0
        return True


def setup_logging() -> None:
    """Log to stderr with time and rank, the one format of every stage."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s rank%(rank)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar on stderr; in a log file (not a terminal) it updates every 10 s."""
    interactive = sys.stderr.isatty()
    yield from tqdm(
        items,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )


def code_version() -> str:
    """The package's version, and the git commit of its checkout when it is one ("0.1.0, git 1a2b3c4"; "+" for
    uncommitted changes): what a block logs at its start, with its settings."""
    try:
        found = version("deepercluster")
    except PackageNotFoundError:
        found = "unknown"
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return found
    if sha.returncode:
        return found
    return f"{found}, git {sha.stdout.strip()}{'+' if dirty.stdout.strip() else ''}"
