rule features:
    input:
        manifest=run_manifest,
        checkpoint=previous_checkpoint,
    output:
        SHARD,
    log:
        log_file(SHARD),
    benchmark:
        benchmark_file(SHARD)
    priority: ROUND_PRIORITY
    conda:
        ENV
    threads: stage_threads(RESOURCES, "features")
    resources:
        **job_resources(RESOURCES, "features"),
    params:
        options=options(
            shard_size=config["features"]["shard_size"],
            dtype=config["features"]["dtype"],
            batch_size=config["features"]["batch_size"],
            image_size=config["data"]["image_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} features {params.options} --shard {wildcards.shard}"
        " --manifest {input.manifest} --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"
