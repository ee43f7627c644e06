"""The three methods and what each clusters: DeepCluster is DeeperCluster's one-super-cluster case;
RotNet clusters nothing (its rounds train on rotations alone).

The rules (which stages a round runs, its super-cluster count, the comparison's runs) and the
training block (its targets) read the switch from here.
"""

from __future__ import annotations

METHODS = ("deepercluster", "deepcluster", "rotnet")


def clusters(method: str) -> bool:
    """Whether ``method``'s rounds cluster the features (all but RotNet)."""
    return method != "rotnet"


def super_clusters(method: str, configured: int) -> int:
    """m, the super-clusters of ``method``'s rounds: the configured m for DeeperCluster, 1 for DeepCluster,
    none for RotNet."""
    if not clusters(method):
        return 0
    return 1 if method == "deepcluster" else configured


def runs(method: str) -> dict[str, str]:
    """Every run, as {folder: method}: the main run (``results``, the config's ``method``) and, for the
    comparison, one run of each other method under ``results/compare/{method}``."""
    return {"results": method, **{f"results/compare/{other}": other for other in METHODS if other != method}}
