# deepercluster: DeeperCluster, DeepCluster and RotNet as a Snakemake workflow.
# Each round r: features of all images -> PCA-whitening -> k-means (super-clusters, then
# sub-clusters inside each) -> pseudo-labels -> a training block -> round r's checkpoint.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval_inputs.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/curate.smk"


rule all:
    input:
        default_targets,
