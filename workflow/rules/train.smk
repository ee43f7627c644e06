rule initial_checkpoint:
    output:
        fill(CHECKPOINT, run=MAIN, round=0),
    log:
        log_file(fill(CHECKPOINT, run=MAIN, round=0)),
    benchmark:
        benchmark_file(fill(CHECKPOINT, run=MAIN, round=0))
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "initial_checkpoint")
    resources:
        **job_resources(RESOURCES, "initial_checkpoint"),
    params:
        options=options(
            seed=config["seed"],
            arch=config["model"]["arch"],
            sobel=config["model"]["sobel"],
        ),
    shell:
        "python -m deepercluster init {params.options} --out {output} > {log} 2>&1"


rule train:
    input:
        manifest=run_manifest,
        previous=previous_checkpoint,
        labels=block_labels,
    output:
        checkpoint=CHECKPOINT,
        metrics=METRICS,
    log:
        log_file(CHECKPOINT),
    benchmark:
        benchmark_file(CHECKPOINT)
    wildcard_constraints:
        round=r"[1-9]\d*",
    priority: ROUND_PRIORITY
    localrule: True
    conda:
        ENV
    params:
        allocation=training_allocation(RESOURCES),
        labels=lambda wildcards, input: options(labels=input.labels or None),
        block=block_options,
        train_dir=TRAIN_DIR,
        options=options(
            launcher=config["launcher"],
            checkpoint_every=config["train"]["checkpoint_every"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster train {params.block} {params.options} {params.allocation} --round {wildcards.round}"
        " --manifest {input.manifest} --previous-checkpoint {input.previous}"
        " {params.labels} --train-dir {params.train_dir} --out {output.checkpoint} > {log} 2>&1"


# The supervised bound's labels: each training image's true class (methods.supervised.label_column), used here only.
rule true_labels:
    input:
        run_manifest,
    output:
        TRUE_LABELS,
    log:
        log_file(TRUE_LABELS),
    benchmark:
        benchmark_file(TRUE_LABELS)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "labels")
    resources:
        **job_resources(RESOURCES, "labels"),
    params:
        options=options(label_column=config["methods"]["supervised"]["label_column"]),
    shell:
        "python -m deepercluster true-labels {params.options} --manifest {input} --out {output} > {log} 2>&1"
