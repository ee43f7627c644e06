"""What a job costs besides its work: the threads a rule gives its stage, the libraries a light stage imports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from test_workflow import snakemake

HEAVY_RULES = ("features", "pca", "super-clusters", "sub-clusters")


def test_heavy_rules_run_their_stage_on_its_cpus_per_task(real_data, tmp_path: Path) -> None:
    """A dry run (-n -p) prints each job's command: its --threads is the stage's cpus_per_task."""
    data = tmp_path / "results" / "data"
    data.mkdir(parents=True)
    shutil.copyfile(real_data.manifest, data / "manifest.parquet")  # so the DAG reaches the shards
    (data / "skipped.tsv").write_text("path\terror\n")
    resources = {"default": {"cpus_per_task": 3}, "pca": {"cpus_per_task": 5}}
    run = snakemake(tmp_path, "-n", "-p", "--cores", "8", resources=resources)
    assert run.returncode == 0, run.stderr[-3000:]
    threads = {}
    for line in run.stdout.splitlines():
        command = re.search(r"python -m deepercluster --threads (\d+) (?:--ranks \d+ )?([\w-]+) ", line)
        if command:
            threads.setdefault(command[2], set()).add(int(command[1]))
    assert threads == {"features": {3}, "pca": {5}, "super-clusters": {3}, "sub-clusters": {3}}, run.stdout[-3000:]


def test_light_stages_import_neither_torch_nor_faiss() -> None:
    """labels and summary read the stages' files through deepercluster.formats, not through k-means; the plan,
    which Snakemake imports to parse the workflow, needs neither."""
    modules = ("manifest", "features", "whitening", "clusters", "labels", "metrics", "evals")
    formats = ", ".join(f"deepercluster.formats.{m}" for m in modules)
    check = (
        f"import sys, deepercluster.cluster.labels, deepercluster.report.summary, deepercluster.plan, {formats}\n"
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # ...while the clustering stage does import both: the check above can tell.
    check = check.replace("deepercluster.cluster.labels", "deepercluster.cluster.levels")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "['faiss', 'torch']", done.stderr


def test_torchvision_is_imported_only_where_a_transform_is_built() -> None:
    """torchvision's import costs about 2 s (its ops import torch._dynamo): no stage's module imports it, so the
    stages that transform no image (the manifest from Debian's files, probes, k-NN, similarity, ...) skip it."""
    check = (
        "import sys\nfrom deepercluster.stages import STAGES, load_stage\n"
        "for stage in STAGES: load_stage(stage)\nbefore = 'torchvision' in sys.modules\n"
        "from deepercluster.data.images import feature_transform\nfeature_transform(32)\n"
        "print(before, 'torchvision' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False True"
