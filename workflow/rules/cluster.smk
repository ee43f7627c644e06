rule pca:
    input:
        feature_shards,
    output:
        "results/rounds/{round}/pca.h5",
    params:
        seed=round_seed,
        options=options(
            dim=config["pca"]["dim"],
            sample_size=config["pca"]["sample_size"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
        ),
    log:
        "results/logs/rounds/{round}/pca.log",
    benchmark:
        "results/benchmarks/rounds/{round}/pca.tsv"
    threads: 2
    shell:
        "{DEEPERCLUSTER} --threads {threads} pca {params.options} --seed {params.seed}"
        " --shards {input} --out {output} > {log} 2>&1"


rule super_clusters:
    input:
        shards=feature_shards,
        pca="results/rounds/{round}/pca.h5",
    output:
        "results/rounds/{round}/clusters/super.h5",
    params:
        seed=round_seed,
        options=options(
            super_clusters=config["kmeans"]["super_clusters"],
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
        ),
    log:
        "results/logs/rounds/{round}/clusters/super.log",
    benchmark:
        "results/benchmarks/rounds/{round}/clusters/super.tsv"
    threads: 2
    shell:
        "{DEEPERCLUSTER} --threads {threads} super-clusters {params.options} --seed {params.seed}"
        " --shards {input.shards} --pca {input.pca} --out {output} > {log} 2>&1"


rule sub_clusters:
    input:
        shards=feature_shards,
        pca="results/rounds/{round}/pca.h5",
        super_file="results/rounds/{round}/clusters/super.h5",
    output:
        "results/rounds/{round}/clusters/sub-{super_cluster}.h5",
    params:
        seed=round_seed,
        options=options(
            sub_clusters=config["kmeans"]["sub_clusters"],
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
        ),
    log:
        "results/logs/rounds/{round}/clusters/sub-{super_cluster}.log",
    benchmark:
        "results/benchmarks/rounds/{round}/clusters/sub-{super_cluster}.tsv"
    threads: 2
    shell:
        "{DEEPERCLUSTER} --threads {threads} sub-clusters {params.options} --seed {params.seed}"
        " --super-cluster {wildcards.super_cluster} --shards {input.shards} --pca {input.pca}"
        " --super-file {input.super_file} --out {output} > {log} 2>&1"


rule labels:
    input:
        manifest="results/data/manifest.parquet",
        super_file="results/rounds/{round}/clusters/super.h5",
        sub_files=sub_cluster_files,
        previous=previous_labels,
    output:
        labels="results/rounds/{round}/labels.parquet",
        sizes="results/rounds/{round}/cluster_sizes.tsv",
        nmi="results/rounds/{round}/nmi.json",
    params:
        previous=lambda wildcards, input: options(previous=input.previous or None),
    log:
        "results/logs/rounds/{round}/labels.log",
    benchmark:
        "results/benchmarks/rounds/{round}/labels.tsv"
    shell:
        "{DEEPERCLUSTER} labels --manifest {input.manifest} --super-file {input.super_file}"
        " --sub-files {input.sub_files} {params.previous} --out {output.labels}"
        " --sizes {output.sizes} --nmi-out {output.nmi} > {log} 2>&1"
