"""Every file between two stages, each read and written by one module of this package (and by no other
code), so that its dataset, column and attribute names live in one place. Free of torch and faiss: the
light stages (labels, summary, report) import neither. docs/file-formats.md describes each file.

| file | module |
|---|---|
| ``results/data/manifest.parquet`` (and the evaluation's) | ``formats.manifest`` |
| ``features/shard-{i}.h5``, an evaluation's ``features.h5`` and ``probe_features.h5`` | ``formats.features`` |
| ``pca.h5`` | ``formats.whitening`` |
| ``clusters/super.h5``, ``clusters/sub-{s}.h5``, an evaluation's ``clusters.h5`` | ``formats.clusters`` |
| a k-means job's whitened spill ``{out}.rank{r}.whitened.h5`` (while it runs) | ``formats.whitened`` |
| ``labels.parquet``, ``cluster_sizes.tsv``, a round's ``nmi.json`` | ``formats.labels`` |
| ``train/metrics.tsv``, the rules' benchmark files | ``formats.metrics`` |
| an evaluation's ``*.json`` and ``similarity.tsv`` | ``formats.evals`` |

Checkpoints (``checkpoint.pt``, ``train/last.pt``, an export's ``.pth``) are torch files: ``deepercluster.checkpoints``.
"""
