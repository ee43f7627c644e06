rule pca:
    input:
        shards=shard_files,
        checkpoint=previous_checkpoint,
    output:
        PCA,
    log:
        log_file(PCA),
    benchmark:
        benchmark_file(PCA)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "pca")
    resources:
        **job_resources(RESOURCES, "pca"),
    params:
        seed=round_seed,
        fraction=lambda wildcards: PLAN.settings(wildcards.run)["pca_fraction"],
        options=options(
            sample_size=config["pca"]["sample_size"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
        ),
    shell:
        "python -m deepercluster --threads {threads} pca {params.options} --fraction {params.fraction} --seed {params.seed}"
        " --shards {input.shards} --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule super_clusters:
    input:
        shards=shard_files,
        pca=PCA,
    output:
        SUPER,
    log:
        log_file(SUPER),
    benchmark:
        benchmark_file(SUPER)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "super_clusters")
    resources:
        **job_resources(RESOURCES, "super_clusters"),
    params:
        seed=round_seed,
        super_clusters=lambda wildcards: PLAN.super_clusters(wildcards.run),
        options=options(
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
            dtype=config["kmeans"]["dtype"],
        ),
    shell:
        "python -m deepercluster --threads {threads} --ranks {resources.tasks} super-clusters --super-clusters {params.super_clusters} {params.options} --seed {params.seed}"
        " --shards {input.shards} --pca {input.pca} --out {output} > {log} 2>&1"


rule sub_clusters:
    input:
        shards=shard_files,
        pca=PCA,
        super_file=SUPER,
    output:
        SUB,
    log:
        log_file(SUB),
    benchmark:
        benchmark_file(SUB)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "sub_clusters")
    resources:
        **job_resources(RESOURCES, "sub_clusters"),
    params:
        seed=round_seed,
        sub_clusters=lambda wildcards: PLAN.sub_clusters(wildcards.run),
        options=options(
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
            dtype=config["kmeans"]["dtype"],
        ),
    shell:
        "python -m deepercluster --threads {threads} --ranks {resources.tasks} sub-clusters --sub-clusters {params.sub_clusters} {params.options} --seed {params.seed}"
        " --super-cluster {wildcards.super_cluster} --shards {input.shards} --pca {input.pca}"
        " --super-file {input.super_file} --out {output} > {log} 2>&1"


rule labels:
    input:
        manifest=run_manifest,
        super_file=SUPER,
        sub_files=sub_cluster_files,
        previous=previous_labels,
    output:
        labels=LABELS,
        sizes=SIZES,
        nmi=ROUND_NMI,
    log:
        log_file(LABELS),
    benchmark:
        benchmark_file(LABELS)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "labels")
    resources:
        **job_resources(RESOURCES, "labels"),
    params:
        previous=lambda wildcards, input: options(previous=input.previous or None),
    shell:
        "python -m deepercluster labels --manifest {input.manifest} --super-file {input.super_file}"
        " --sub-files {input.sub_files} {params.previous} --out {output.labels}"
        " --sizes {output.sizes} --nmi-out {output.nmi} > {log} 2>&1"
