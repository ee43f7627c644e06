rule features:
    input:
        manifest="results/data/manifest.parquet",
        checkpoint=previous_checkpoint,
    output:
        "{run}/rounds/{round}/features/shard-{shard}.h5",
    log:
        "{run}/logs/rounds/{round}/features/shard-{shard}.log",
    benchmark:
        "{run}/benchmarks/rounds/{round}/features/shard-{shard}.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "features")
    resources:
        **job_resources(RESOURCES, "features"),
    params:
        options=options(
            shard_size=config["features"]["shard_size"],
            batch_size=config["features"]["batch_size"],
            image_size=config["data"]["image_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} features {params.options} --shard {wildcards.shard}"
        " --manifest {input.manifest} --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"
