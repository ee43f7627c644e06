# Evaluations of any checkpoint: {run}/evals/{name}/..., where name is round-{r} of the run (results:
# the main run; results/compare/{method}: the comparison's) or a name under `checkpoints:` (checked and
# copied to results/checkpoints/{name}.pt). They only read a checkpoint: when it exists and is up to
# date, nothing of its round is rerun. Rule compare: the table of random init, RotNet, DeepCluster and
# DeeperCluster, training the runs it lacks.
# Their input functions (eval_checkpoint, eval_rounds, ...) are in common.smk.


rule eval_manifest:
    output:
        manifest=EVAL_MANIFEST,
        skipped="results/data/eval/skipped.tsv",
    log:
        "results/logs/data/eval/manifest.log",
    benchmark:
        "results/benchmarks/data/eval/manifest.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            verify_images=config["data"]["verify_images"],
            workers=config["data"]["workers"],
            source=EVAL["data"]["source"],
            path=EVAL["data"]["path"],
            path_column=EVAL["data"]["path_column"],
            label_from_folder=EVAL["data"]["label_from_folder"],
            split=EVAL["data"]["split"],
            max_images=EVAL["data"]["max_images"],
        ),
    shell:
        "python -m deepercluster manifest {params.options}"
        " --manifest {output.manifest} --skipped {output.skipped} > {log} 2>&1"


rule import_checkpoint:
    input:
        lambda wildcards: registered(wildcards)["path"],
    output:
        "results/checkpoints/{name}.pt",
    log:
        "results/logs/checkpoints/{name}.log",
    benchmark:
        "results/benchmarks/checkpoints/{name}.tsv"
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
        "{run}/evals/{name}/features.h5",
    log:
        "{run}/logs/evals/{name}/features.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/features.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            shard_size=ALL_IMAGES,
            batch_size=config["features"]["batch_size"],
            image_size=config["data"]["image_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} features {params.options} --shard 0"
        " --manifest {input.manifest} --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule eval_pca:
    input:
        "{run}/evals/{name}/features.h5",
    output:
        "{run}/evals/{name}/pca.h5",
    log:
        "{run}/logs/evals/{name}/pca.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/pca.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            dim=EVAL["pca_dim"],
            sample_size=config["pca"]["sample_size"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
        ),
    shell:
        "python -m deepercluster --threads {threads} pca {params.options} --shards {input} --out {output} > {log} 2>&1"


rule eval_kmeans:
    input:
        features="{run}/evals/{name}/features.h5",
        pca="{run}/evals/{name}/pca.h5",
    output:
        "{run}/evals/{name}/clusters.h5",
    log:
        "{run}/logs/evals/{name}/clusters.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/clusters.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            super_clusters=EVAL["clusters"],
            iterations=config["kmeans"]["iterations"],
            cache_mb=config["kmeans"]["cache_mb"],
        ),
    shell:
        "python -m deepercluster --threads {threads} super-clusters {params.options}"
        " --shards {input.features} --pca {input.pca} --out {output} > {log} 2>&1"


rule eval_probe_features:
    input:
        manifest=EVAL_MANIFEST,
        checkpoint=eval_checkpoint,
    output:
        "{run}/evals/{name}/probe_features.h5",
    log:
        "{run}/logs/evals/{name}/probe_features.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/probe_features.tsv"
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
        features="{run}/evals/{name}/probe_features.h5",
    output:
        json="{run}/evals/{name}/linear.json",
        plot=report(
            "{run}/evals/{name}/linear.png",
            caption="../report/linear.rst",
            category="Evaluations",
            subcategory="{name}",
            labels={
                "run": "{run}",
                "checkpoint": "{name}",
                "evaluation": "linear probes per layer",
            },
        ),
    log:
        "{run}/logs/evals/{name}/linear.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/linear.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            label_column=EVAL["label_column"],
            val_fraction=EVAL["val_fraction"],
            weight_decays=EVAL["probe_weight_decays"],
            max_iterations=EVAL["probe_iterations"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-linear {params.options} --features {input.features}"
        " --manifest {input.manifest} --out {output.json} --plot {output.plot} > {log} 2>&1"


rule eval_knn:
    input:
        manifest=EVAL_MANIFEST,
        features="{run}/evals/{name}/features.h5",
    output:
        report(
            "{run}/evals/{name}/knn.json",
            caption="../report/knn.rst",
            category="Evaluations",
            subcategory="{name}",
            labels={
                "run": "{run}",
                "checkpoint": "{name}",
                "evaluation": "k-NN top-1",
            },
        ),
    log:
        "{run}/logs/evals/{name}/knn.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/knn.tsv"
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
        " --features {input.features} --out {output} > {log} 2>&1"


rule eval_nmi:
    input:
        manifest=EVAL_MANIFEST,
        features=eval_rounds("features.h5"),
        pcas=eval_rounds("pca.h5"),
    output:
        json="{run}/evals/{name}/nmi.json",
        plot=report(
            "{run}/evals/{name}/nmi.png",
            caption="../report/eval-nmi.rst",
            category="Evaluations",
            subcategory="{name}",
            labels={
                "run": "{run}",
                "checkpoint": "{name}",
                "evaluation": "NMI of k-means",
            },
        ),
    log:
        "{run}/logs/evals/{name}/nmi.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/nmi.tsv"
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
        clusters="{run}/evals/{name}/clusters.h5",
    output:
        report(
            "{run}/evals/{name}/clusters.png",
            caption="../report/eval-clusters.rst",
            category="Evaluations",
            subcategory="{name}",
            labels={
                "run": "{run}",
                "checkpoint": "{name}",
                "evaluation": "images of a few clusters",
            },
        ),
    log:
        "{run}/logs/evals/{name}/clusters-png.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/clusters-png.tsv"
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
        "{run}/evals/{name}/voc07.json",
    log:
        "{run}/logs/evals/{name}/voc07.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/voc07.tsv"
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
        "{run}/evals/{name}/retrieval.json",
    log:
        "{run}/logs/evals/{name}/retrieval.log",
    benchmark:
        "{run}/benchmarks/evals/{name}/retrieval.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            seed=config["seed"],
            image_size=config["data"]["image_size"],
            dim=EVAL["retrieval_dim"],
            eigenvalue_floor=config["pca"]["eigenvalue_floor"],
            batch_size=config["features"]["batch_size"],
            workers=config["data"]["workers"],
        ),
    shell:
        "python -m deepercluster --threads {threads} eval-retrieval {params.options} --images {input.images}"
        " --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"


rule compare_table:
    input:
        compared_evals,
    output:
        table=report(
            "results/compare/table.md",
            caption="../report/compare.rst",
            category="Evaluations",
            subcategory="compare",
            labels={"run": "compare", "checkpoint": "compared", "evaluation": "table"},
        ),
        tsv="results/compare/table.tsv",
        plot=report(
            "results/compare/linear.png",
            caption="../report/compare.rst",
            category="Evaluations",
            subcategory="compare",
            labels={
                "run": "compare",
                "checkpoint": "compared",
                "evaluation": "linear probes per layer",
            },
        ),
    log:
        "results/logs/compare/table.log",
    benchmark:
        "results/benchmarks/compare/table.tsv"
    conda:
        ENV
    threads: stage_threads(RESOURCES, "evaluate")
    resources:
        **job_resources(RESOURCES, "evaluate"),
    params:
        options=options(
            labels=list(COMPARED),
            checkpoints=[checkpoint_file(*row) for row in COMPARED.values()],
            evals=[eval_folder(*row) for row in COMPARED.values()],
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
        "results/compare/table.md",
        "results/compare/table.tsv",
        "results/compare/linear.png",
    localrule: True
