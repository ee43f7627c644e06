"""DeeperCluster, DeepCluster and RotNet: unsupervised convnet training by clustering.

The package holds one function per workflow stage (see ``stages``); the Snakemake rules
call them through ``python -m deepercluster <stage>``, and the tests call them directly.
"""

import os

# Process defaults, set when the package is imported (before torch, faiss or numpy is, in the CLI's processes,
# the ranks it starts and the jobs submitit starts); each one yields to a value already in the environment.
# - torch and faiss each bring an OpenMP runtime; busy-waiting threads of one starve the other (with the default,
#   spinning, policy every k-means pass on small chunks was about 50x slower on 2 cores). No result changes.
# - numpy asks for transparent huge pages for each array of 4 MB or more. On a VM whose host backs the guest's
#   memory on first touch, a fresh huge page costs far more than 512 small ones: on the 2-core VM of
#   docs/scale.md a 0.74 GB array took 10.9 s to fill the first time with them, 0.28 s without.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
