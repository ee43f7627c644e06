"""DeeperCluster, DeepCluster and RotNet: unsupervised convnet training by clustering.

The package holds one function per workflow stage (see ``stages``); the Snakemake rules
call them through ``python -m deepercluster <stage>``, and the tests call them directly.
"""

import os

# numpy asks the kernel for transparent huge pages for each array of 4 MB or more, read once, when numpy is imported.
# On a VM whose host backs the guest's memory on first touch, a fresh huge page costs far more than 512 small ones:
# on the 2-core VM of docs/science.md, a 0.74 GB array took 10.9 s to fill the first time with them, 0.28 s without,
# and a linear-probe job spent most of its time in the kernel clearing them. NUMPY_MADVISE_HUGEPAGE=1 asks again.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
