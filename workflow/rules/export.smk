# A model to take away: {run}/export/{name}.pth, the backbone of any checkpoint (round-{r} or a name
# under `checkpoints:`, as for the evaluations) as a plain state dict with the Sobel layer folded into
# conv1, ready for supervised training. Its input function (eval_checkpoint) is in common.smk.


rule export:
    input:
        eval_checkpoint,
    output:
        EXPORT,
    log:
        log_file(EXPORT),
    benchmark:
        benchmark_file(EXPORT)
    conda:
        ENV
    threads: stage_threads(RESOURCES, "default")
    resources:
        **job_resources(RESOURCES, "default"),
    params:
        options=options(image_size=config["data"]["image_size"]),
    shell:
        "python -m deepercluster export {params.options} --checkpoint {input} --out {output} > {log} 2>&1"
