# Evaluations of any checkpoint: {run}/evals/{name}/..., where name is round-{r} of the run (results:
# the main run; results/compare/{method}: the comparison's) or a name under `checkpoints:` (checked and
# copied to results/checkpoints/{name}.pt). They only read a checkpoint: when it exists and is up to
# date, nothing of its round is rerun. Rule compare: the table of random init, RotNet, DeepCluster and
# DeeperCluster, training the runs it lacks.
# Their input functions (eval_checkpoint, eval_rounds, ...) and report flags are in common.smk.


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


rule eval_linear:
    input:
        manifest=EVAL_MANIFEST,
        features=evaluation("probe_features.h5"),
    output:
        json=evaluation("linear.json"),
        plot=reported("linear.png", "linear", "linear probes per layer"),
    log:
        log_file(evaluation("linear.json")),
    benchmark:
        benchmark_file(evaluation("linear.json"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            label_column=EVAL["label_column"],
            weight_decays=EVAL["probe_weight_decays"],
            max_iterations=EVAL["probe_iterations"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-linear {params.options} --features {input.features}"
        " --manifest {input.manifest} --out {output.json} --plot {output.plot} > {log} 2>&1"


rule eval_knn:
    input:
        manifest=EVAL_MANIFEST,
        features=evaluation("features.h5"),
        probe_features=evaluation("probe_features.h5"),
    output:
        reported("knn.json", "knn", "k-NN top-1"),
    log:
        log_file(evaluation("knn.json")),
    benchmark:
        benchmark_file(evaluation("knn.json"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"], k=EVAL["knn_k"], label_column=EVAL["label_column"]
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-knn {params.options} --manifest {input.manifest}"
        " --features {input.features} --probe-features {input.probe_features} --out {output} > {log} 2>&1"


rule eval_nmi:
    input:
        manifest=EVAL_MANIFEST,
        features=eval_rounds("features.h5"),
        pcas=eval_rounds("pca.h5"),
    output:
        json=evaluation("nmi.json"),
        plot=reported("nmi.png", "eval-nmi", "NMI of k-means"),
    log:
        log_file(evaluation("nmi.json")),
    benchmark:
        benchmark_file(evaluation("nmi.json"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            k=EVAL["clusters"],
            seeds=EVAL["nmi_seeds"],
            iterations=config["kmeans"]["iterations"],
        ),
        first_round=lambda wildcards: options(
            first_round=0 if wildcards.name.startswith("round-") else None
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-nmi {params.options} {params.first_round}"
        " --manifest {input.manifest} --features {input.features} --pcas {input.pcas}"
        " --out {output.json} --plot {output.plot} > {log} 2>&1"


rule eval_clusters:
    input:
        manifest=EVAL_MANIFEST,
        clusters=evaluation("kmeans.h5"),
    output:
        reported("clusters.png", "eval-clusters", "images of a few clusters"),
    log:
        log_file(evaluation("clusters.png")),
    benchmark:
        benchmark_file(evaluation("clusters.png"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(seed=config["seed"], shown=EVAL["clusters_shown"]),
    shell:
        "python -m deepercluster eval-clusters {params.options} --manifest {input.manifest}"
        " --clusters {input.clusters} --out {output} > {log} 2>&1"


rule eval_voc07:
    input:
        voc=configured("voc07"),
        checkpoint=eval_checkpoint,
    output:
        evaluation("voc07.json"),
    log:
        log_file(evaluation("voc07.json")),
    benchmark:
        benchmark_file(evaluation("voc07.json"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            image_size=config["data"]["image_size"],
            epochs=EVAL["voc07_epochs"],
            batch_size=EVAL["batch_size"],
            lr=EVAL["voc07_lr"],
            weight_decay=EVAL["weight_decay"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-voc07 {params.options} --voc {input.voc}"
        " --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule eval_retrieval:
    input:
        images=configured("retrieval"),
        checkpoint=eval_checkpoint,
    output:
        evaluation("retrieval.json"),
    log:
        log_file(evaluation("retrieval.json")),
    benchmark:
        benchmark_file(evaluation("retrieval.json"))
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            image_size=config["data"]["image_size"],
            dim=EVAL["retrieval_dim"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
            batch_size=config["features"]["batch_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-retrieval {params.options} --images {input.images}"
        " --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule eval_similarity:
    input:
        manifest=EVAL_MANIFEST,
        checkpoints=similarity_checkpoints,
    output:
        tsv=f"{SIMILARITY}.tsv",
        plot=report(
            f"{SIMILARITY}.png",
            caption="../report/similarity.rst",
            category="Evaluations",
            subcategory="{run}",
            labels={
                "run": "{run}",
                "checkpoint": "rounds",
                "evaluation": "change from round 0",
            },
        ),
    log:
        log_file(f"{SIMILARITY}.tsv"),
    benchmark:
        benchmark_file(f"{SIMILARITY}.tsv")
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            images=EVAL["similarity_images"],
            image_size=config["data"]["image_size"],
            batch_size=config["features"]["batch_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-similarity {params.options} --manifest {input.manifest}"
        " --checkpoints {input.checkpoints} --out {output.tsv} --plot {output.plot} > {log} 2>&1"


rule compare_table:
    input:
        compared_evals,
    output:
        table=compared_report("table.md", "table"),
        tsv=f"{COMPARE}/table.tsv",
        plot=compared_report("linear.png", "linear probes per layer"),
    log:
        log_file(f"{COMPARE}/table.md"),
    benchmark:
        benchmark_file(f"{COMPARE}/table.md")
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            labels=list(COMPARED),
            checkpoints=[PLAN.checkpoint_file(*row) for row in COMPARED.values()],
            evals=[PLAN.eval_folder(*row) for row in COMPARED.values()],
            label_column=EVAL["label_column"],
        ),
    shell:
        "python -m deepercluster compare {params.options}"
        " --out {output.table} --tsv {output.tsv} --plot {output.plot} > {log} 2>&1"


# The target `snakemake compare`: the table, and every round of the runs behind it, so deleting any of
# their files reruns it and what depends on it, as the default target for the main run.
rule compare:
    input:
        compared_rounds,
        f"{COMPARE}/table.md",
        f"{COMPARE}/table.tsv",
        f"{COMPARE}/linear.png",
    localrule: True
