"""How much training changed each conv layer, round by round, from where the run started (its round 0).

A change of weight norm says nothing here: every conv is followed by BatchNorm, so the network does not depend
on a conv's scale. Two measures that do:

- the cosine between a conv layer's weights and round 0's (1: the same filters up to scale);
- the linear CKA (Kornblith et al., 2019) between the layer's activations and round 0's on the same test
  images: the layer's ReLU output average-pooled as the linear probes' (``pooled``, below 10,000 dims), centred,
  CKA = <K, L> / (|K| |L|) of their Gram matrices over the images (1: the same function up to rotation and
  scale).

Stage 'eval-similarity' -> ``similarity.tsv`` (round, layer, weight_cosine, cka) and ``similarity.png``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from deepercluster.data.images import ImageDataset, feature_transform, network_input
from deepercluster.evaluate.backbone import conv_activations, device, frozen_backbone, image_loader, layer_names
from deepercluster.evaluate.common import save_figure
from deepercluster.evaluate.linear import activation_shapes, pooled, probe_pools
from deepercluster.formats.evals import write_similarity
from deepercluster.formats.manifest import read_manifest, test_images
from deepercluster.nn.models import ConvNet

log = logging.getLogger(__name__)


def centred_gram(x: np.ndarray) -> np.ndarray:
    """The Gram matrix over the rows of ``x`` (images) after removing each column's mean, in float64."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    return x @ x.T


def linear_cka(gram_a: np.ndarray, gram_b: np.ndarray) -> float:
    """Linear CKA of two representations of the same images, from their ``centred_gram``s."""
    return float((gram_a * gram_b).sum() / np.sqrt((gram_a * gram_a).sum() * (gram_b * gram_b).sum()))


def conv_weights(model: ConvNet) -> list[torch.Tensor]:
    """Each conv layer's weight, in order (the Sobel filter is not one)."""
    return [m.weight.detach().flatten() for m in model.features if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def layer_grams(
    model: ConvNet, images: pd.DataFrame, image_size: int, batch_size: int, workers: int
) -> list[np.ndarray]:
    """The ``centred_gram`` of each conv layer's pooled activations over the manifest rows ``images``."""
    pools = probe_pools(activation_shapes(model, image_size))
    loader = image_loader(ImageDataset(images, feature_transform(image_size)), batch_size, workers)
    batches = [pooled(conv_activations(model, network_input(x, device())), pools)[: len(pools)] for x, _ in loader]
    return [centred_gram(torch.cat(layer).cpu().numpy()) for layer in zip(*batches, strict=True)]


def similarity(
    *,
    manifest: str,
    checkpoints: list[str],
    out: str,
    plot: str,
    images: int,
    image_size: int,
    batch_size: int,
    workers: int,
) -> None:
    """Stage 'eval-similarity': each conv layer of each of ``checkpoints`` (rounds 0, 1, ...) against round 0's: its
    weights' cosine and its activations' linear CKA on the first ``images`` test images -> ``out``, ``plot``."""
    shown = test_images(read_manifest(manifest)).iloc[:images]
    start, _ = frozen_backbone(checkpoints[0])
    names, weights = layer_names(start), conv_weights(start)
    grams = layer_grams(start, shown, image_size, batch_size, workers)
    rows = []
    for r, checkpoint in enumerate(checkpoints):
        model, _ = frozen_backbone(checkpoint)
        own = layer_grams(model, shown, image_size, batch_size, workers) if r else grams
        for name, w0, w, g0, g in zip(names, weights, conv_weights(model), grams, own, strict=True):
            cosine = float(torch.nn.functional.cosine_similarity(w0, w, dim=0))
            rows.append({"round": r, "layer": name, "weight_cosine": cosine, "cka": linear_cka(g0, g)})
        log.info(
            "round %d: %s",
            r,
            ", ".join(
                f"{row['layer']} cosine {row['weight_cosine']:.3f} CKA {row['cka']:.3f}" for row in rows[-len(names) :]
            ),
        )
    table = pd.DataFrame(rows)
    write_similarity(out, table)
    save_figure(similarity_figure(table, len(shown)), plot)


def similarity_figure(table: pd.DataFrame, images: int) -> Figure:
    """Weight cosine and activation CKA with round 0, per conv layer, over rounds."""
    figure = Figure(figsize=(10, 4))
    titles = {
        "weight_cosine": "conv weights: cosine with round 0",
        "cka": f"activations: linear CKA with round 0 ({images} test images)",
    }
    for axes, (column, title) in zip(figure.subplots(1, 2), titles.items(), strict=True):
        for layer, rows in table.groupby("layer", sort=False):
            axes.plot(rows["round"], rows[column], "o-", label=layer)
        axes.set_xlabel("round")
        axes.set_xticks(sorted(table["round"].unique()))
        axes.set_ylim(min(0.0, float(table[column].min())), 1.02)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    return figure
