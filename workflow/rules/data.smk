checkpoint manifest:
    output:
        manifest=MANIFEST,
        skipped=SKIPPED,
    log:
        log_file(MANIFEST),
    benchmark:
        benchmark_file(MANIFEST)
    conda:
        ENV
    threads: max(1, config["data"]["workers"])
    resources:
        **job_resources(RESOURCES, "manifest"),
    params:
        options=options(
            seed=config["seed"],
            source=config["data"]["source"],
            path=config["data"]["path"],
            path_column=config["data"]["path_column"],
            label_from_folder=config["data"]["label_from_folder"],
            split=config["data"]["split"],
            max_images=config["data"]["max_images"],
            uncurated=config["data"]["uncurated"],
            verify_images=config["data"]["verify_images"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster manifest {params.options}"
        " --manifest {output.manifest} --skipped {output.skipped} > {log} 2>&1"
