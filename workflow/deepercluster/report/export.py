"""Stage 'export': a checkpoint's backbone as a plain state dict for supervised training.

The Sobel layer is folded into the first conv (``models.fold_sobel``), as the DeeperCluster paper
does before training on ImageNet with labels: the model takes normalised RGB images. The file holds
only tensors, strings, integers and booleans, so ``torch.load(path, weights_only=True)`` reads it,
and ``build_model(arch, sobel=False, folded_sobel=folded_sobel)`` loads its ``state_dict`` strictly.
"""

from __future__ import annotations

import logging

import torch

from deepercluster.checkpoints import exported_model, load_model, save_checkpoint
from deepercluster.data.images import IMAGENET_MEAN, IMAGENET_STD
from deepercluster.files import sha256
from deepercluster.nn.models import fold_sobel

log = logging.getLogger(__name__)


def export_model(*, checkpoint: str, out: str, image_size: int) -> None:
    """``out`` = ``checkpoints.exported_model`` of the backbone in ``checkpoint``, its Sobel layer (if any) folded
    into conv1; its provenance is the checkpoint's sha256."""
    model, state = load_model(checkpoint)
    folded_sobel = model.sobel is not None
    if folded_sobel:
        model = fold_sobel(model)
    log.info("%s: %s, conv1 %s (Sobel folded: %s)", checkpoint, state["arch"], model.features[0], folded_sobel)
    save_checkpoint(
        out,
        exported_model(
            state_dict=model.state_dict(),
            arch=state["arch"],
            folded_sobel=folded_sobel,
            feature_dim=model.feature_dim,
            image_size=image_size,
            mean=torch.tensor(IMAGENET_MEAN),
            std=torch.tensor(IMAGENET_STD),
            provenance={"checkpoint_sha256": sha256(checkpoint)},
        ),
    )
