"""The linters CI holds the code to, run as tests so that the README's test command is all CI runs: ruff (lint and
format), snakefmt and snakemake's own lint of the workflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CODE = ["workflow", "tests", "benchmarks"]


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "ruff"), "check", *CODE],
        [str(BIN / "ruff"), "format", "--check", *CODE],
        [str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
        [sys.executable, "-m", "snakemake", "--lint"],
    ],
    ids=["ruff", "ruff-format", "snakefmt", "snakemake-lint"],
)
def test_the_code_passes_its_linter(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_no_code_is_kept_from_the_formatter() -> None:
    """One formatter for all the code: ruff format, its settings in pyproject.toml; no line or block exempt."""
    exempt = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in CODE
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(f"# fmt: {word}" in line for word in ("skip", "off"))
    ]
    assert not exempt, f"kept from ruff format: {', '.join(exempt[:10])}"
