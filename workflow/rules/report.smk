# The run's report (`snakemake --report report.html`): the workflow description (workflow/report/
# workflow.rst), results/summary.tsv, each round's figures (below) and the evaluations that were made
# (their outputs are flagged in evaluate.smk).

FIGURE_TITLES = {
    "training": "training curves",
    "sizes_plot": "cluster sizes",
    "nmi_plot": "NMI over rounds",
    "grid": "images of a few clusters",
}
ROUND_REPORT = {
    name: report(
        path,
        caption=f"../report/{name}.rst",
        category="Rounds",
        subcategory="round {round}",
        labels={"round": "{round}", "figure": FIGURE_TITLES[name]},
    )
    for name, path in ROUND_FIGURES.items()
}


rule round_figures:
    input:
        metrics="results/rounds/{round}/train/metrics.tsv",
        manifest="results/data/manifest.parquet",
        labels=round_file("labels.parquet"),
        sizes=round_file("cluster_sizes.tsv"),
        nmi=rounds_until("nmi.json"),
    output:
        **ROUND_REPORT,
    log:
        "results/logs/rounds/{round}/figures.log",
    benchmark:
        "results/benchmarks/rounds/{round}/figures.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "report")
    resources:
        **job_resources(RESOURCES, "report"),
    params:
        options=options(seed=config["seed"], shown=EVAL["clusters_shown"]),
        figures=figure_options,
    shell:
        "python -m deepercluster report-round {params.options} --round {wildcards.round}"
        " --metrics {input.metrics} {params.figures} > {log} 2>&1"
