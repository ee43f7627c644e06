"""Linear probes on every conv layer of a frozen backbone (DeeperCluster Figure 2, DeepCluster Table 1).

Two stages, so that the network runs once per checkpoint and the classifiers can train to
convergence on a cache:

- ``eval-probe-features``: each conv layer's ReLU output, for every evaluation image (centre crops,
  backbone in eval mode), pooled two ways -> ``probe_features.h5``: ``pooled``, the papers' average
  pooling to s x s with channels * s * s below 10,000 (VGG-16: 9216, 9216, 8192, 8192, 9216 x 3,
  8192 x 6; AlexNet: 9600, 9216, 9600, 9600, 9216), and ``channels``, the global average of each
  channel (32, 64, 128 for the small convnet), where a random network is far weaker.
- ``eval-linear``: per layer and pooling, a multinomial logistic regression on the standardised
  features of the evaluation's train images, trained to convergence (full-batch L-BFGS); its L2
  weight is chosen among ``weight_decays`` on a held-out fifth of them, then it is refitted on them
  all. Top-1 on every test image, with a 95% interval bootstrapped over them, and which images it got right.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepercluster.data.images import ImageDataset, feature_transform, network_input
from deepercluster.evaluate.backbone import (
    LabelledSet,
    conv_activations,
    device,
    frozen_backbone,
    image_loader,
    labelled_roles,
    layer_names,
    probe_pool_size,
)
from deepercluster.evaluate.common import accuracy_figure, bootstrap_interval, save_figure, standardise
from deepercluster.files import sha256
from deepercluster.formats.evals import ids_fingerprint, pack_correct, write_json
from deepercluster.formats.features import POOLINGS, probe_attributes, probe_features_writer, read_probe_layer
from deepercluster.formats.manifest import read_manifest
from deepercluster.logs import progress
from deepercluster.nn.models import ConvNet

log = logging.getLogger(__name__)

SELECTION_FRACTION = 0.2  # of the train images, held out to choose each probe's L2 weight


def activation_shapes(model: ConvNet, image_size: int) -> list[tuple[int, int]]:
    """(channels, smaller spatial side) of each conv layer's activation for ``image_size`` inputs."""
    parameter = next(model.parameters())
    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
        return [(a.shape[1], min(a.shape[2:])) for a in conv_activations(model, x)]


def probe_pools(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(pool side s, pooled dim channels * s * s) of each conv layer."""
    return [(s, channels * s * s) for channels, height in shapes for s in [probe_pool_size(channels, height)]]


def pooled(activations: list[torch.Tensor], pools: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each layer's activations average-pooled to s x s and flattened, then each one's channels averaged over
    space (the ``pooled`` layers, then the ``channels`` ones)."""
    papers = [F.adaptive_avg_pool2d(a, s).flatten(1) for a, (s, _) in zip(activations, pools, strict=True)]
    return [*papers, *(a.mean((2, 3)) for a in activations)]


@torch.no_grad()
def probe_features(*, checkpoint: str, manifest: str, out: str, image_size: int, batch_size: int, workers: int) -> None:
    """Stage 'eval-probe-features': every conv layer's pooled activations (both poolings) of every image."""
    images = read_manifest(manifest)
    model, state = frozen_backbone(checkpoint)
    shapes = activation_shapes(model, image_size)
    pools, names = probe_pools(shapes), layer_names(model)
    dims = {f"pooled/{name}": dim for name, (_, dim) in zip(names, pools, strict=True)}
    dims |= {f"channels/{name}": channels for name, (channels, _) in zip(names, shapes, strict=True)}
    log.info("probe features of %s (%s) on %d images: %s", checkpoint, state["arch"], len(images), dims)
    loader = image_loader(ImageDataset(images, feature_transform(image_size)), batch_size, workers)
    attrs = {"checkpoint_sha256": sha256(checkpoint), "arch": state["arch"], "pools": [s for s, _ in pools]}
    with probe_features_writer(out, images["id"].to_numpy(), names, dims, **attrs) as write:
        start = 0
        for x, ids in progress(loader, "probe features", total=len(loader), unit="batch"):
            activations = conv_activations(model, network_input(x, device()))
            write(start, [values.cpu().numpy() for values in pooled(activations, pools)])
            start += len(ids)


CHECK_EVERY = 25  # L-BFGS iterations between two looks at the held-out top-1
STILL = 0.001  # a held-out top-1 that moved less than this over CHECK_EVERY iterations has stopped moving


def hits(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Whether the probe (W classes x dims, b) puts each row of ``x`` in its class ``y``."""
    return F.linear(x, weight, bias).argmax(1) == y


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    weight_decay: float,
    max_iterations: int,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multinomial logistic regression, mean cross-entropy + weight_decay / 2 * |W|^2, by full-batch L-BFGS
    from ``start`` (W, b; zeros by default; W is classes x dims, as ``nn.Linear`` holds it), for at most
    ``max_iterations`` iterations.

    With ``held_out`` (x, y), it also stops once the held-out top-1 moved less than ``STILL`` over the last
    ``CHECK_EVERY`` iterations. Returns (W, b, iterations); fewer than ``max_iterations``: it stopped before.
    """
    weight = torch.zeros(classes, x.shape[1]) if start is None else start[0].clone()
    bias = torch.zeros(classes) if start is None else start[1].clone()
    chunk = min(CHECK_EVERY, max_iterations) if held_out is not None else max_iterations
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=chunk,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    one_hot = F.one_hot(y, classes).to(x.dtype)

    def closure() -> torch.Tensor:
        # The gradient by hand: (softmax - one-hot)^T x reads x row-major, several times faster on CPU
        # than autograd's x^T (softmax - one-hot) over a transposed x. W as classes x dims: MKL's x W^T is
        # twice as fast as x W with W dims x classes on AMD's CPUs (60 against 117 ms at 8,000 x 9,248).
        logits = F.linear(x, weight, bias)
        loss = F.cross_entropy(logits, y) + weight_decay / 2 * weight.pow(2).sum()
        error = (logits.softmax(1) - one_hot) / len(y)
        weight.grad = error.t() @ x + weight_decay * weight
        bias.grad = error.sum(0)
        return loss

    def held_out_top1() -> float:
        return float(hits(*held_out, weight, bias).float().mean())

    iterations, top1 = 0, held_out_top1() if held_out is not None else 0.0
    while iterations < max_iterations:
        optimizer.param_groups[0]["max_iter"] = min(chunk, max_iterations - iterations)
        before = optimizer.state[weight].get("n_iter", 0)
        optimizer.step(closure)  # L-BFGS keeps its history from one call to the next
        done = optimizer.state[weight]["n_iter"] - before
        iterations += done
        if done < optimizer.param_groups[0]["max_iter"]:
            break  # converged
        if held_out is not None:
            top1, previous = held_out_top1(), top1
            if abs(top1 - previous) < STILL:
                break
    return weight.detach(), bias.detach(), iterations


def probe_layer(
    x: np.ndarray, data: LabelledSet, weight_decays: list[float], seed: int, max_iterations: int
) -> dict[str, object]:
    """One layer's probe: L2 weight chosen on a held-out part of the train images, refit on them all, top-1 on
    the test images and its interval."""
    train, classes = np.flatnonzero(data.train), len(data.classes)
    held_out = np.zeros(len(train), bool)
    held_out[np.random.default_rng(seed).permutation(len(train))[: round(len(train) * SELECTION_FRACTION)]] = True
    fit_x, select_x = map(torch.from_numpy, standardise(x, train[~held_out], train[held_out]))
    fit_y, select_y = (torch.from_numpy(data.targets[train[rows]]) for rows in (~held_out, held_out))
    selection, solutions, steps, start = {}, {}, {}, None
    for weight_decay in sorted(weight_decays, reverse=True):  # each fit starts from the more regularised one
        weight, bias, iterations = fit_logistic(
            fit_x, fit_y, classes, weight_decay, max_iterations, start, held_out=(select_x, select_y)
        )
        steps[weight_decay] = iterations
        solutions[weight_decay] = start = (weight, bias)
        selection[weight_decay] = float(hits(select_x, select_y, *start).float().mean())
        log.info(
            "  weight decay %g: held-out top-1 %.4f after %d L-BFGS iterations",
            weight_decay,
            selection[weight_decay],
            iterations,
        )
    chosen = max(weight_decays, key=lambda wd: (selection[wd], wd))  # ties: the stronger regularisation
    train_x, test_x = map(torch.from_numpy, standardise(x, train, np.flatnonzero(~data.train)))
    train_y = torch.from_numpy(data.targets[data.train])
    # The refit on all the train images runs as many iterations as the chosen fit needed to stop moving.
    weight, bias, iterations = fit_logistic(train_x, train_y, classes, chosen, steps[chosen], solutions[chosen])
    correct = hits(test_x, torch.from_numpy(data.targets[~data.train]), weight, bias).numpy()
    return {
        "top1": float(correct.mean()),
        "ci95": bootstrap_interval(correct, seed),
        "test_correct": pack_correct(correct),
        "weight_decay": chosen,
        "selection_top1": {str(wd): top1 for wd, top1 in selection.items()},
        "iterations": iterations,
        "converged": steps[chosen] < max_iterations,
    }


def linear_probe(
    *,
    features: str,
    manifest: str,
    out: str,
    plot: str,
    label_column: str,
    weight_decays: list[float],
    max_iterations: int,
    seed: int,
) -> None:
    """Stage 'eval-linear': test top-1 of a converged linear probe per conv layer and pooling -> ``out``, ``plot``."""
    data = labelled_roles(manifest, label_column)
    attrs = probe_attributes(features)
    layers = []
    for pooling in POOLINGS:
        for name, pool in zip(attrs["layers"], attrs["pools"], strict=True):
            x = read_probe_layer(features, f"{pooling}/{name}", data.ids)
            log.info(
                "%s %s (%d dims): choosing the weight decay on a held-out fifth of the train images",
                name,
                pooling,
                x.shape[1],
            )
            result = probe_layer(x, data, weight_decays, seed, max_iterations)
            log.info(
                "%s %s (%d dims): test top-1 %.4f, 95%% interval %s, weight decay %g, %d L-BFGS iterations",
                name,
                pooling,
                x.shape[1],
                result["top1"],
                np.round(result["ci95"], 4).tolist(),
                result["weight_decay"],
                result["iterations"],
            )
            layers.append(
                {
                    "layer": name,
                    "pooling": pooling,
                    "pool": int(pool) if pooling == "pooled" else 1,
                    "dim": int(x.shape[1]),
                    **result,
                }
            )
    write_json(
        out,
        {
            "features": features,
            "checkpoint_sha256": str(attrs["checkpoint_sha256"]),
            "arch": str(attrs["arch"]),
            "label_column": label_column,
            "classes": len(data.classes),
            "train_images": int(data.train.sum()),
            "test_images": int((~data.train).sum()),
            "test_ids_sha256": ids_fingerprint(data.ids[~data.train]),
            "weight_decays": weight_decays,
            "layers": layers,
        },
    )
    save_figure(accuracy_figure({Path(out).parent.name: layers}, 1 / len(data.classes)), plot)
