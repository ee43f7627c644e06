# A curated subset of the pool (deepercluster.data.curate): results/curated/{name}/manifest.parquet, drawn balanced
# over the clusters that checkpoint {name} gives the pool (round-{r}: the main run's round r), and its figures. A
# checkpoint rule: the curated run (curation.train) plans its shards from the subset's size.


checkpoint curate:
    input:
        manifest=MANIFEST,
        labels=curated_round(LABELS),
        sub_files=curated_sub_files,
        shards=curated_shards,
        pca=curated_round(PCA),
    output:
        manifest=CURATED_MANIFEST,
        sizes=CURATED_SIZES,
    log:
        log_file(CURATED_MANIFEST),
    benchmark:
        benchmark_file(CURATED_MANIFEST)
    conda:
        ENV
    threads: stage_threads(RESOURCES, "curate")
    resources:
        **job_resources(RESOURCES, "curate"),
    params:
        options=options(
            size=config["curation"]["size"],
            strategy=config["curation"]["strategy"],
            balance=config["curation"]["balance"],
            duplicate_similarity=config["curation"]["duplicate_similarity"],
            seed=config["seed"],
            cache_mb=config["kmeans"]["cache_mb"],
            dtype=config["kmeans"]["dtype"],
        ),
    shell:
        "python -m deepercluster --threads {threads} curate {params.options} --manifest {input.manifest}"
        " --labels {input.labels} --sub-files {input.sub_files} --shards {input.shards} --pca {input.pca}"
        " --out {output.manifest} --sizes {output.sizes} > {log} 2>&1"


rule curation_figures:
    input:
        manifest=MANIFEST,
        curated=CURATED_MANIFEST,
        labels=curated_round(LABELS),
        sizes=CURATED_SIZES,
    output:
        **CURATION_REPORT,
    log:
        log_file(curation_figures()["sizes_plot"]),
    benchmark:
        benchmark_file(curation_figures()["sizes_plot"])
    conda:
        ENV
    threads: stage_threads(RESOURCES, "curate")
    resources:
        **job_resources(RESOURCES, "curate"),
    params:
        options=options(seed=config["seed"], shown=EVAL["clusters_shown"]),
    shell:
        "python -m deepercluster curation-figures {params.options} --manifest {input.manifest}"
        " --curated {input.curated} --labels {input.labels} --sizes {input.sizes}"
        " --sizes-plot {output.sizes_plot} --grid {output.grid} > {log} 2>&1"
