# The run's report (`snakemake --report report.html`): the workflow description (workflow/report/
# workflow.rst), results/summary.tsv, each round's figures (below) and the evaluations that were made
# (their outputs are flagged in evaluate.smk).


rule round_figures:
    input:
        metrics=fill(METRICS, run=MAIN),
        manifest=MANIFEST,
        labels=round_file(LABELS),
        sizes=round_file(SIZES),
        nmi=rounds_until(ROUND_NMI),
    output:
        **ROUND_REPORT,
    log:
        log_file(PLAN.figures()["training"]),
    benchmark:
        benchmark_file(PLAN.figures()["training"])
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


rule summary:
    input:
        metrics=[fill(METRICS, run=MAIN, round=r) for r in TRAINED_ROUNDS],
        nmi=PLAN.clustering_files(MAIN, ROUND_NMI, TRAINED_ROUNDS),
        sizes=PLAN.clustering_files(MAIN, SIZES, TRAINED_ROUNDS),
        benchmarks=lambda wildcards: [
            path
            for stages in summary_benchmarks(wildcards).values()
            for files in stages.values()
            for path in files
        ],
    output:
        tsv=report(
            f"{SUMMARY}.tsv",
            caption="../report/summary.rst",
            category="Run",
            labels={"table": "summary, one row per round (TSV)"},
        ),
        html=report(
            f"{SUMMARY}.html",
            caption="../report/summary.rst",
            category="Run",
            labels={"table": "summary, one row per round"},
        ),
    log:
        log_file(f"{SUMMARY}.tsv"),
    benchmark:
        benchmark_file(f"{SUMMARY}.tsv")
    conda:
        ENV
    threads: stage_threads(RESOURCES, "summary")
    resources:
        **job_resources(RESOURCES, "summary"),
    params:
        clustering=lambda wildcards, input: options(
            nmi=input.nmi or None, sizes=input.sizes or None
        ),
        benchmarks=lambda wildcards: options(benchmarks=summary_benchmarks(wildcards)),
    shell:
        "python -m deepercluster summary --metrics {input.metrics} {params.clustering}"
        " {params.benchmarks} --out {output.tsv} --html {output.html} > {log} 2>&1"
