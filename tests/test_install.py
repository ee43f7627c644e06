"""The install step links profiles/ where Snakemake finds a profile name, so the README's
`snakemake --profile slurm` runs as typed from the repository root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout-like folder (the repository's workflow files) whose .venv is the one running the tests."""
    root = tmp_path / "deepercluster"
    root.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("workflow", "envs", "profiles"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(sys.prefix)
    return root


def user_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose home and config folder are under tmp_path, with the venv activated."""
    return {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def link_profiles(checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "envs/install.sh", "--profiles"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
    )


def test_profile_slurm_runs_as_typed_after_the_install(checkout: Path, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    before = subprocess.run(
        ["snakemake", "--profile", "slurm", "-n"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )
    assert before.returncode != 0 and "no profile.yaml (or config.yaml) found" in before.stderr

    linked = link_profiles(checkout, env)
    assert linked.returncode == 0, linked.stderr
    for name in ("slurm", "local"):
        link = tmp_path / "config" / "snakemake" / name
        assert link.is_symlink() and link.resolve() == (checkout / "profiles" / name).resolve()
    assert link_profiles(checkout, env).stdout == ""  # a second install leaves the links as they are

    run = subprocess.run(
        ["snakemake", "--profile", "slurm", "-n"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    planned = run.stdout + run.stderr
    assert "Using profile slurm" in planned
    # the profile's `config: [launcher=slurm]` entry
    assert "Config file config.yaml is extended by additional config specified via the command line" in planned
    assert "Job stats" in planned and "checkpoint manifest:" in planned and "rule all:" in planned


def test_install_leaves_a_different_profile_of_the_same_name_alone(checkout: Path, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    theirs = tmp_path / "config" / "snakemake" / "slurm"
    theirs.mkdir(parents=True)
    (theirs / "config.yaml").write_text("executor: slurm\njobs: 7\n")
    linked = link_profiles(checkout, env)
    assert linked.returncode == 0
    assert (theirs / "config.yaml").read_text() == "executor: slurm\njobs: 7\n" and not theirs.is_symlink()
    assert f"warning: {theirs} already exists and is not a link to" in linked.stderr
    assert "snakemake --profile profiles/slurm" in linked.stderr
    assert (tmp_path / "config" / "snakemake" / "local").is_symlink()


def test_install_replaces_a_link_into_a_checkout_that_no_longer_exists(checkout: Path, tmp_path: Path) -> None:
    env = user_env(tmp_path)
    stale = tmp_path / "config" / "snakemake" / "slurm"
    stale.parent.mkdir(parents=True)
    stale.symlink_to(tmp_path / "deleted-checkout" / "profiles" / "slurm")
    linked = link_profiles(checkout, env)
    assert linked.returncode == 0 and "which no longer exists" in linked.stdout
    assert stale.is_symlink() and stale.resolve() == (checkout / "profiles" / "slurm").resolve()


# What `snakemake --report` imports (snakemake.report: its html_reporter and templates).
REPORT_IMPORTS = ("pygments", "jinja2")


def required_distributions(requirements: list[str]) -> set[str]:
    """The installed distributions ``requirements`` bring in, with theirs, transitively (extras followed)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for line in requires(requirement.name) or []:
            needed = Requirement(line)
            extras = [*requirement.extras, ""]
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(needed)
    return {name for name, _ in seen}


def test_the_main_install_has_what_the_report_needs() -> None:
    """`bash envs/install.sh` (no --test) installs pyproject's main dependencies: what the report imports must be
    among them, not only brought in by the test tools (pytest brings pygments)."""
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    main = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = required_distributions(main)
    providers = packages_distributions()
    missing = [module for module in REPORT_IMPORTS if not {canonicalize_name(d) for d in providers[module]} & installed]
    assert missing == [], f"the report imports {missing}, which no main dependency installs"
