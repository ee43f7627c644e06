"""The run's report: `snakemake --report` of the small test run, with the evaluations of round 1."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import test_workflow
from test_workflow import snakemake

# The fixture: a run of .test/config.yaml (2 rounds), made once for this module.
deepercluster_run = test_workflow.deepercluster_run

# Small evaluations: 200 test images, 4 k-means clusters (clusters_shown keeps its default: the round
# figures use it, and a change would rerun them).
EVALUATION = {"data": {"max_images": 200}, "clusters": 4}
EVALS = [f"results/evals/round-1/{name}" for name in ("linear.json", "knn.json", "nmi.json", "clusters.png")]
ROUND_FIGURES = {
    "training.png": "training curves",
    "cluster_sizes.png": "cluster sizes",
    "nmi.png": "NMI over rounds",
    "clusters.png": "images of a few clusters",
}


def report_variable(html: str, name: str) -> object:
    """The value of ``var <name> = ...`` in the report's page (its results, categories, description)."""
    start = re.search(r"\bvar " + name + r' =\s*(?=[{\["])', html).end()  # a JSON value, not a script's
    return json.JSONDecoder().raw_decode(html[start:])[0]


def test_the_report_holds_the_settings_every_round_figure_and_the_evaluations(deepercluster_run: Path) -> None:
    made = snakemake(deepercluster_run, "all", *EVALS, evaluation=EVALUATION)
    assert made.returncode == 0, made.stderr[-3000:]
    built = snakemake(deepercluster_run, "--report", "report.zip", "all", *EVALS, evaluation=EVALUATION)
    assert built.returncode == 0, built.stderr[-3000:]

    with zipfile.ZipFile(deepercluster_run / "report.zip") as archive:
        html = archive.read("report/report.html").decode()
        results, categories = report_variable(html, "results"), report_variable(html, "categories")
        pictures = {path: archive.read(f"report/{entry['data_uri']}") for path, entry in results.items()}
    description = " ".join(re.sub(r"<[^>]+>", "", report_variable(html, "workflow_desc")).split())

    # The method and this run's settings (.test/config.yaml): 2 rounds, 2 x 4 clusters, 300 images.
    assert "DeeperCluster: 2 rounds" in description and "2 super-clusters, then 4 sub-clusters" in description
    assert "at most 300 images" in description and "epochs per round: 1" in description

    figures = {f"results/rounds/{r}/figures/{name}" for r in (1, 2) for name in ROUND_FIGURES}
    evaluations = {f"results/evals/round-1/{name}" for name in ("linear.png", "knn.json", "nmi.png", "clusters.png")}
    assert categories["Rounds"] == {f"round {r}": sorted(f for f in figures if f"/{r}/" in f) for r in (1, 2)}
    assert categories["Evaluations"] == {"round-1": sorted(evaluations)}
    assert sorted(path for files in categories["Run"].values() for path in files) == [
        "results/summary.html",
        "results/summary.tsv",
    ]
    for path in figures:
        r, name = re.search(r"rounds/(\d)/figures/(.+)$", path).groups()
        assert results[path]["labels"] == {"round": r, "figure": ROUND_FIGURES[name]}
        assert f"Round {r}" in results[path]["caption"] or f"rounds 1 to {r}" in results[path]["caption"]
    for path in [*figures, *(path for path in evaluations if path.endswith(".png"))]:
        image = Image.open(io.BytesIO(pictures[path]))
        assert image.format == "PNG" and image.width >= 400 and image.height >= 250, (path, image.size)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10, f"{path} is blank"

    # The tables as the run wrote them: the summary, and the k-NN result.
    page = pictures["results/summary.html"].decode()
    header = re.findall(r"<th>(\w+)</th>", page)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)]
    summary = pd.read_csv(deepercluster_run / "results/summary.tsv", sep="\t")
    assert header == summary.columns.tolist() and [row[0] for row in rows] == ["1", "2"]
    assert [row[header.index("clusters")] for row in rows] == ["8", "8"]
    assert pictures["results/summary.tsv"] == (deepercluster_run / "results/summary.tsv").read_bytes()
    knn = json.loads(pictures["results/evals/round-1/knn.json"])
    assert knn == json.loads((deepercluster_run / "results/evals/round-1/knn.json").read_text())
    assert knn["test_images"] > 0 and knn["train_images"] > 0
