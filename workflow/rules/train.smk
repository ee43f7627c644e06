rule initial_checkpoint:
    input:
        config["init_checkpoint"] or [],
    output:
        "results/rounds/0/checkpoint.pt",
    log:
        "results/logs/rounds/0/checkpoint.log",
    benchmark:
        "results/benchmarks/rounds/0/checkpoint.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "initial_checkpoint")
    resources:
        **job_resources(RESOURCES, "initial_checkpoint"),
    params:
        options=options(
            seed=config["seed"],
            init_checkpoint=config["init_checkpoint"],
            arch=config["model"]["arch"],
            sobel=config["model"]["sobel"],
        ),
    shell:
        "python -m deepercluster init {params.options} --out {output} > {log} 2>&1"


rule train:
    input:
        manifest="results/data/manifest.parquet",
        previous=previous_checkpoint,
        labels=round_file("labels.parquet"),
    output:
        checkpoint="{run}/rounds/{round}/checkpoint.pt",
        metrics="{run}/rounds/{round}/train/metrics.tsv",
    log:
        "{run}/logs/rounds/{round}/checkpoint.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/checkpoint.tsv"
    wildcard_constraints:
        round=r"[1-9]\d*",
    localrule: True
    conda:
        ENV
    params:
        seed=round_seed,
        allocation=training_allocation(RESOURCES),
        labels=lambda wildcards, input: options(labels=input.labels or None),
        method=lambda wildcards: RUNS[wildcards.run],
        options=options(
            launcher=config["launcher"],
            epochs=config["train"]["epochs_per_round"],
            batch_size=config["train"]["batch_size"],
            lr=config["train"]["lr"],
            momentum=config["train"]["momentum"],
            weight_decay=config["train"]["weight_decay"],
            checkpoint_every=config["train"]["checkpoint_every"],
            dropout=config["train"]["dropout"],
            image_size=config["data"]["image_size"],
            min_crop_scale=config["train"]["min_crop_scale"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster train --method {params.method} {params.options} {params.allocation} --round {wildcards.round}"
        " --seed {params.seed} --manifest {input.manifest} --previous-checkpoint {input.previous}"
        " {params.labels} --train-dir {wildcards.run}/rounds/{wildcards.round}/train --out {output.checkpoint} > {log} 2>&1"


rule summary:
    input:
        metrics=[f"results/rounds/{r}/train/metrics.tsv" for r in TRAINED_ROUNDS],
        nmi=clustering_files("results", "nmi.json", TRAINED_ROUNDS),
        sizes=clustering_files("results", "cluster_sizes.tsv", TRAINED_ROUNDS),
        benchmarks=round_benchmarks,
    output:
        tsv=report(
            "results/summary.tsv",
            caption="../report/summary.rst",
            category="Run",
            labels={"table": "summary, one row per round (TSV)"},
        ),
        html=report(
            "results/summary.html",
            caption="../report/summary.rst",
            category="Run",
            labels={"table": "summary, one row per round"},
        ),
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "summary")
    resources:
        **job_resources(RESOURCES, "summary"),
    params:
        clustering=lambda wildcards, input: options(
            nmi=input.nmi or None, sizes=input.sizes or None
        ),
    shell:
        "python -m deepercluster summary --metrics {input.metrics} {params.clustering}"
        " --benchmarks {input.benchmarks} --out {output.tsv} --html {output.html} > {log} 2>&1"
