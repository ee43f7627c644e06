# Evaluations of any checkpoint: {run}/evals/{name}/..., where name is round-{r} of the run (results:
# the main run; results/compare/{method}: the comparison's) or a name under `checkpoints:`. They only read a
# checkpoint and what eval_inputs.smk makes of it: when it exists and is up to date, nothing of its round is
# rerun. Their input functions (eval_checkpoint, eval_rounds, ...) and report flags are in common.smk.


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
