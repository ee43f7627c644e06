# The comparison: the table of random init, RotNet, DeepCluster, DeeperCluster and the supervised bound,
# from the evaluations of each run's rounds, training the runs it lacks. Its input functions (compared_evals,
# compared_rounds, ...) are in common.smk.


rule compare_table:
    input:
        compared_evals,
    output:
        table=compared_report("table.md", "table"),
        tsv=f"{COMPARE}/table.tsv",
        plot=compared_report("linear.png", "linear probes per layer"),
    log:
        log_file(f"{COMPARE}/table.md"),
    benchmark:
        benchmark_file(f"{COMPARE}/table.md")
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            labels=list(COMPARED),
            checkpoints=[PLAN.checkpoint_file(*row) for row in COMPARED.values()],
            evals=[PLAN.eval_folder(*row) for row in COMPARED.values()],
            label_column=EVAL["label_column"],
        ),
    shell:
        "python -m deepercluster compare {params.options}"
        " --out {output.table} --tsv {output.tsv} --plot {output.plot} > {log} 2>&1"


# The target `snakemake compare`: the table, and every round of the runs behind it, so deleting any of
# their files reruns it and what depends on it, as the default target for the main run.
rule compare:
    input:
        compared_rounds,
        f"{COMPARE}/table.md",
        f"{COMPARE}/table.tsv",
        f"{COMPARE}/linear.png",
    localrule: True
