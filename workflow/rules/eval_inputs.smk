# What the evaluations of a checkpoint read: its images (the evaluation's manifest), the checkpoint itself
# (round-{r} of a run, or a name under `checkpoints:`, checked and copied to results/checkpoints/{name}.pt),
# its features of every image, their PCA and k-means, and the probes' features per layer. Their input
# functions (eval_checkpoint, eval_rounds, ...) are in common.smk; the evaluations are in evaluate.smk.


rule eval_images:
    output:
        manifest=f"{EVAL_DATA}/{{role}}.parquet",
        skipped=f"{EVAL_DATA}/{{role}}-skipped.tsv",
    log:
        log_file(f"{EVAL_DATA}/{{role}}.parquet"),
    benchmark:
        benchmark_file(f"{EVAL_DATA}/{{role}}.parquet")
    wildcard_constraints:
        role="train|test",
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=lambda wildcards: options(
            seed=config["seed"],
            verify_images=config["data"]["verify_images"],
            workers=config["data"]["workers"],
            **EVAL["data" if wildcards.role == "test" else "train_data"],
        ),
    shell:
        "python -m deepercluster manifest {params.options}"
        " --manifest {output.manifest} --skipped {output.skipped} > {log} 2>&1"


rule eval_manifest:
    input:
        train=eval_role("train"),
        test=eval_role("test"),
    output:
        EVAL_MANIFEST,
    log:
        log_file(EVAL_MANIFEST),
    benchmark:
        benchmark_file(EVAL_MANIFEST)
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    shell:
        "python -m deepercluster eval-manifest --train {input.train} --test {input.test} --out {output} > {log} 2>&1"


rule import_checkpoint:
    input:
        lambda wildcards: registered(wildcards)["path"],
    output:
        IMPORTED,
    log:
        log_file(IMPORTED),
    benchmark:
        benchmark_file(IMPORTED)
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=lambda wildcards: options(
            arch=registered(wildcards)["arch"], sobel=registered(wildcards)["sobel"]
        ),
    shell:
        "python -m deepercluster import-checkpoint {params.options} --source {input} --out {output} > {log} 2>&1"


rule eval_features:
    input:
        manifest=EVAL_MANIFEST,
        checkpoint=eval_checkpoint,
    output:
        evaluation("features.h5"),
    log:
        log_file(evaluation("features.h5")),
    benchmark:
        benchmark_file(evaluation("features.h5"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            batch_size=config["features"]["batch_size"],
            image_size=config["data"]["image_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-features {params.options}"
        " --manifest {input.manifest} --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule eval_pca:
    input:
        features=evaluation("features.h5"),
        checkpoint=eval_checkpoint,
    output:
        evaluation("pca.h5"),
    log:
        log_file(evaluation("pca.h5")),
    benchmark:
        benchmark_file(evaluation("pca.h5"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            dim=EVAL["pca_dim"],
            fraction=1.0,
            sample_size=config["pca"]["sample_size"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
        ),
    shell:
        "python -m deepercluster --threads {threads} pca {params.options} --shards {input.features}"
        " --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule eval_kmeans:
    input:
        features=evaluation("features.h5"),
        pca=evaluation("pca.h5"),
    output:
        evaluation("kmeans.h5"),
    log:
        log_file(evaluation("kmeans.h5")),
    benchmark:
        benchmark_file(evaluation("kmeans.h5"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            k=EVAL["clusters"],
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
            dtype=config["kmeans"]["dtype"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-kmeans {params.options}"
        " --features {input.features} --pca {input.pca} --out {output} > {log} 2>&1"


rule eval_probe_features:
    input:
        manifest=EVAL_MANIFEST,
        checkpoint=eval_checkpoint,
    output:
        evaluation("probe_features.h5"),
    log:
        log_file(evaluation("probe_features.h5")),
    benchmark:
        benchmark_file(evaluation("probe_features.h5"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            image_size=config["data"]["image_size"],
            batch_size=config["features"]["batch_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-probe-features {params.options}"
        " --checkpoint {input.checkpoint} --manifest {input.manifest} --out {output} > {log} 2>&1"
