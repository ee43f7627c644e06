"""Evaluations of any checkpoint, each one stage writing ``results/evals/{name}/...``.

- ``linear``: linear probes on every conv layer of the frozen backbone (linear.json, .png).
- ``knn``: k-nearest-neighbour top-1 on the penultimate feature (knn.json).
- ``nmi``: NMI between k-means on the features and each metadata column, over rounds (nmi.json, .png).
- ``clusters``: 9 random images of a few clusters with their dominant metadata (clusters.png).
- ``voc07``: Pascal VOC 2007-layout multi-label classification, FC6-8 and ALL (voc07.json).
- ``retrieval``: instance retrieval mAP with R-MAC (retrieval.json).
- ``compare``: several checkpoints side by side (results/compare/table.md).
- ``external``: a foreign (torchvision-style) state dict wrapped into our checkpoint format.

They share ``backbone`` (a checkpoint's frozen backbone, its conv activations, a labelled
train/val split) and ``common`` (average precision, figures, atomic JSON and PNG outputs).
"""
