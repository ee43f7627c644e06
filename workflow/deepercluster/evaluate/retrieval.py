"""Instance retrieval with R-MAC (Tolias et al., 2016; DeepCluster Table 5): mAP over queries.

The last conv layer's activation (after its ReLU) is max-pooled over the R-MAC regions
(3 levels of square regions, about 40% overlap); each region vector is L2-normalised,
PCA-whitened and L2-normalised again, the regions are summed and the sum L2-normalised.
The whitening is learnt on the ``whitening`` images of the list (another set than the
queries and database), or on the database when there are none. Database images are
ranked by cosine similarity to each query; AP is non-interpolated.

The list is a CSV with one row per image: ``path`` (relative to the CSV's folder, or
absolute), ``role`` (``query``, ``database`` or ``whitening``) and ``group``: a database
image matches a query when their groups are equal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deepercluster.cluster.pca import fit_whitening
from deepercluster.data.images import ImageDataset, feature_transform, network_input
from deepercluster.errors import EvaluationError
from deepercluster.evaluate.backbone import conv_activations, device, frozen_backbone, image_loader
from deepercluster.evaluate.common import average_precision
from deepercluster.files import sha256
from deepercluster.formats.evals import write_json
from deepercluster.formats.whitening import Whitening, unit_rows
from deepercluster.logs import progress
from deepercluster.nn.models import ConvNet

log = logging.getLogger(__name__)

ROLES = ("query", "database", "whitening")
LEVELS = 3
OVERLAP = 0.4


def rmac_regions(width: int, height: int, levels: int = LEVELS) -> np.ndarray:
    """R-MAC regions (x, y, side, side) of a ``width`` x ``height`` map, level l of side floor(2 min / (l + 1)).

    Level l has l regions along the shorter side and l + extra along the longer one, extra
    chosen so that consecutive regions overlap by about 40% (Tolias et al.'s rule).
    """
    short = min(width, height)
    steps = np.arange(2, 8)
    step_size = (max(width, height) - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short**2 - short * step_size) / short**2 - OVERLAP))) + 1
    extra_w, extra_h = (extra, 0) if height < width else (0, extra) if height > width else (0, 0)
    regions = []
    for level in range(1, levels + 1):
        side = int(np.floor(2 * short / (level + 1)))
        half = np.floor(side / 2 - 1)
        starts = []
        for size, extra_along in ((width, extra_w), (height, extra_h)):
            count = level + extra_along
            stride = (size - side) / (count - 1) if count > 1 else 0.0
            starts.append((np.floor(half + np.arange(count) * stride) - half).astype(int))
        regions += [(x, y, side, side) for y in starts[1] for x in starts[0] if side > 0]
    return np.array(regions, dtype=np.int64)


def region_vectors(activations: torch.Tensor, regions: np.ndarray) -> torch.Tensor:
    """[batch, regions, channels]: each region's per-channel max, L2-normalised."""
    pooled = torch.stack([activations[:, :, y : y + s, x : x + s].amax(dim=(2, 3)) for x, y, s, _ in regions], 1)
    return torch.nn.functional.normalize(pooled, dim=2)


@torch.no_grad()
def image_regions(model: ConvNet, paths: list[str], image_size: int, batch_size: int, workers: int) -> np.ndarray:
    """[images, regions, channels] R-MAC region vectors of the last conv layer (centre crops)."""
    loader = image_loader(ImageDataset.of_files(paths, feature_transform(image_size)), batch_size, workers)
    batches = []
    for x, _ in progress(loader, "R-MAC regions", total=len(loader), unit="batch"):
        activations = conv_activations(model, network_input(x, device()))[-1]
        batches.append(region_vectors(activations, rmac_regions(activations.shape[3], activations.shape[2])).cpu())
    return torch.cat(batches).numpy().astype(np.float32)


def rmac(regions: np.ndarray, whitening: Whitening) -> np.ndarray:
    """[images, d] R-MAC descriptors: whiten + L2 each region vector, sum over regions, L2."""
    images, count, channels = regions.shape
    return unit_rows(whitening(regions.reshape(-1, channels)).reshape(images, count, -1).sum(1))


def read_image_list(images: str) -> pd.DataFrame:
    """The retrieval CSV: path (made absolute), role, group."""
    table = pd.read_csv(images, dtype={"group": str})
    missing = {"path", "role", "group"} - set(table.columns)
    if missing:
        raise EvaluationError(f"{images} lacks the columns {sorted(missing)}: it needs path, role and group")
    unknown = set(table["role"]) - set(ROLES)
    if unknown:
        raise EvaluationError(f"{images} has roles {sorted(unknown)}; valid: {', '.join(ROLES)}")
    if not {"query", "database"} <= set(table["role"]):
        raise EvaluationError(f"{images} needs query and database rows: give some rows role query, others database")
    table["path"] = [str(Path(images).parent / p) for p in table["path"]]  # an absolute path stays as it is
    return table


def query_average_precisions(
    queries: np.ndarray, database: np.ndarray, query_groups: np.ndarray, database_groups: np.ndarray
) -> np.ndarray:
    """AP of each query (NaN when no database image shares its group), database ranked by cosine similarity."""
    scores = queries @ database.T
    return np.array([average_precision(s, database_groups == g) for s, g in zip(scores, query_groups, strict=True)])


def retrieval(
    *,
    images: str,
    checkpoint: str,
    out: str,
    image_size: int,
    dim: int | None,
    eigenvalue_floor: float,
    batch_size: int,
    workers: int,
) -> None:
    """Stage 'eval-retrieval': R-MAC mAP of the queries of ``images`` (a CSV) against its database -> ``out``."""
    table = read_image_list(images)
    model, _ = frozen_backbone(checkpoint)
    regions = image_regions(model, table["path"].tolist(), image_size, batch_size, workers)
    learn_on = "whitening" if (table["role"] == "whitening").any() else "database"
    if learn_on == "database":
        log.warning("%s has no whitening rows: the PCA-whitening is learnt on the database", images)
    learning = regions[(table["role"] == learn_on).to_numpy()]
    whitening, _ = fit_whitening([learning.reshape(-1, regions.shape[2])], dim, eigenvalue_floor)
    descriptors = rmac(regions, whitening)
    query, database = (table["role"] == "query").to_numpy(), (table["role"] == "database").to_numpy()
    groups = table["group"].to_numpy()
    ap = query_average_precisions(descriptors[query], descriptors[database], groups[query], groups[database])
    scored = ~np.isnan(ap)
    log.info(
        "R-MAC retrieval: mAP %.4f over %d queries, %d database images",
        np.mean(ap[scored]),
        scored.sum(),
        database.sum(),
    )
    write_json(
        out,
        {
            "mAP": float(np.mean(ap[scored])) if scored.any() else None,
            "queries": int(scored.sum()),
            "database_images": int(database.sum()),
            "whitening_images": len(learning),
            "whitening_learnt_on": learn_on,
            "regions_per_image": int(regions.shape[1]),
            "dim": whitening.dim,
            "checkpoint_sha256": sha256(checkpoint),
        },
    )
