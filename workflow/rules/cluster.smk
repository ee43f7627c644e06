rule pca:
    input:
        lambda wildcards: shard_files(wildcards.run, wildcards.round),
    output:
        "{run}/rounds/{round}/pca.h5",
    log:
        "{run}/logs/rounds/{round}/pca.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/pca.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "pca")
    resources:
        **job_resources(RESOURCES, "pca"),
    params:
        seed=round_seed,
        options=options(
            dim=config["pca"]["dim"],
            sample_size=config["pca"]["sample_size"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
        ),
    shell:
        "python -m deepercluster --threads {threads} pca {params.options} --seed {params.seed}"
        " --shards {input} --out {output} > {log} 2>&1"


rule super_clusters:
    input:
        shards=lambda wildcards: shard_files(wildcards.run, wildcards.round),
        pca="{run}/rounds/{round}/pca.h5",
    output:
        "{run}/rounds/{round}/clusters/super.h5",
    log:
        "{run}/logs/rounds/{round}/clusters/super.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/clusters/super.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "super_clusters")
    resources:
        **job_resources(RESOURCES, "super_clusters"),
    params:
        seed=round_seed,
        super_clusters=lambda wildcards: run_super_clusters(wildcards.run),
        options=options(
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
        ),
    shell:
        "python -m deepercluster --threads {threads} --tasks {resources.tasks} super-clusters --super-clusters {params.super_clusters} {params.options} --seed {params.seed}"
        " --shards {input.shards} --pca {input.pca} --out {output} > {log} 2>&1"


rule sub_clusters:
    input:
        shards=lambda wildcards: shard_files(wildcards.run, wildcards.round),
        pca="{run}/rounds/{round}/pca.h5",
        super_file="{run}/rounds/{round}/clusters/super.h5",
    output:
        "{run}/rounds/{round}/clusters/sub-{super_cluster}.h5",
    log:
        "{run}/logs/rounds/{round}/clusters/sub-{super_cluster}.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/clusters/sub-{super_cluster}.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "sub_clusters")
    resources:
        **job_resources(RESOURCES, "sub_clusters"),
    params:
        seed=round_seed,
        options=options(
            sub_clusters=config["kmeans"]["sub_clusters"],
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
        ),
    shell:
        "python -m deepercluster --threads {threads} --tasks {resources.tasks} sub-clusters {params.options} --seed {params.seed}"
        " --super-cluster {wildcards.super_cluster} --shards {input.shards} --pca {input.pca}"
        " --super-file {input.super_file} --out {output} > {log} 2>&1"


rule labels:
    input:
        manifest="results/data/manifest.parquet",
        super_file="{run}/rounds/{round}/clusters/super.h5",
        sub_files=lambda wildcards: sub_cluster_files(wildcards.run, wildcards.round),
        previous=previous_labels,
    output:
        labels="{run}/rounds/{round}/labels.parquet",
        sizes="{run}/rounds/{round}/cluster_sizes.tsv",
        nmi="{run}/rounds/{round}/nmi.json",
    log:
        "{run}/logs/rounds/{round}/labels.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/labels.tsv"
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
