"""DeeperCluster, DeepCluster and RotNet: unsupervised convnet training by clustering.

The package holds one function per workflow stage (see ``stages``); the Snakemake rules
call them through ``python -m deepercluster <stage>``, and the tests call them directly.
"""
