import shlex

import pandas as pd
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")


wildcard_constraints:
    round=r"\d+",
    shard=r"\d+",
    super_cluster=r"\d+",


DEEPERCLUSTER = "python -m deepercluster"


def options(**values):
    """Config values as a stage's command-line options: --name value, --flag/--no-flag; None is left out."""
    words = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            words += [flag, *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(words)


def default_targets():
    return ["results/rounds/1/labels.parquet"]


def round_seed(wildcards):
    """Each round's own seed, derived from the config's."""
    return config["seed"] + 1000 * int(wildcards.round)


def previous_checkpoint(wildcards):
    """Round r's features come from round r-1's checkpoint (round 0: the initial weights)."""
    return f"results/rounds/{int(wildcards.round) - 1}/checkpoint.pt"


def feature_shards(wildcards):
    """Every shard of round r; their number is known once the manifest exists."""
    manifest = checkpoints.manifest.get().output.manifest
    images = pd.read_parquet(manifest, columns=["id"]).shape[0]
    shards = -(-images // config["features"]["shard_size"])
    return [f"results/rounds/{wildcards.round}/features/shard-{i}.h5" for i in range(shards)]


def sub_cluster_files(wildcards):
    return [
        f"results/rounds/{wildcards.round}/clusters/sub-{s}.h5"
        for s in range(config["kmeans"]["super_clusters"])
    ]


def previous_labels(wildcards):
    """The previous round's labels, for the NMI between consecutive rounds (none in round 1)."""
    r = int(wildcards.round)
    return [f"results/rounds/{r - 1}/labels.parquet"] if r > 1 else []
