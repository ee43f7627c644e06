"""The training block of a round: ``epochs`` epochs on the round's pseudo-labels, resumable exactly.

``train_block`` reads top to bottom: ranks, data, networks, optimiser, resume, loop. It saves
``train/last.pt`` (model, heads, optimiser, sampler position, every rank's RNG state; each
training group's sub-class heads in a file of the group's beside it) every
``checkpoint_every`` iterations, at every epoch end, and at the iteration where the
pre-emption signal (SIGUSR2, sent by SLURM before a time-out or pre-emption) arrives, before
handing over to submitit to requeue the job. Run again after a kill, it resumes from there
and ends with the same weights as an uninterrupted run, but only when last.pt was written
for the same block: the same inputs and every setting that changes the result (see
``block_provenance``). Augmentation is seeded per sample from (seed, epoch, group,
position), so it depends neither on DataLoader workers nor on where the block was
interrupted nor on how many ranks share a batch.

The per-iteration log is kept beside last.pt (``running-metrics.tsv``, cut back to the
resume point on resume); ``metrics.tsv``, the rule's declared output, is written from it
when the block ends.

Ranks (DeeperCluster, section "Distributed training"): when the number of ranks is a
multiple of the number of super-classes, ranks form one training group per super-class
and each rank of group g sees only super-class g's images at its rotation; the backbone
and the super-class head are held by all ranks and their gradients averaged over all, the
sub-class head W_g only by group g's ranks (a process group per training group): each holds
1/p of its classes, and the softmax over them all is taken inside the group (the group's
features gathered, the rows' max, sum of exponentials and target logit all-reduced), so a
rank of the paper's layout holds k/p x D weights, not k x D. Otherwise (fewer ranks than
groups: one process on a laptop) every rank takes its share of each global batch and holds
every head. Either way
BatchNorm statistics are computed over the global batch and the ranks holding a weight
hold it identically.
"""

from __future__ import annotations

import csv
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepercluster import methods
from deepercluster.checkpoints import load_checkpoint, load_model, save_checkpoint
from deepercluster.data import ImageDataset, train_transform
from deepercluster.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    global_batchnorm,
    group_of_ranks,
    init_distributed,
    is_main_process,
    synchronise_gradients,
)
from deepercluster.errors import InputError
from deepercluster.files import atomic_output, sha256
from deepercluster.formats import read_manifest
from deepercluster.labels import read_labels
from deepercluster.objectives import ROTATIONS, Heads, Targets, super_class, targets_for
from deepercluster.sampler import UniformClusterSampler
from deepercluster.seeds import derived_seed, id_hash

log = logging.getLogger(__name__)


class TrainingInputError(InputError):
    """Training settings or inputs that cannot make a block (batch size vs ranks, labels vs manifest, launcher)."""


METRICS = [
    *("round", "epoch", "iteration", "lr", "images_per_s"),
    *("loss", "loss_super", "acc_super", "loss_sub", "acc_sub"),
]


@dataclass(frozen=True)
class Layout:
    """How the ranks share a block: ``groups`` training groups; this rank is ``part`` of the ``parts`` of ``group``."""

    groups: int
    group: int
    part: int
    parts: int

    @property
    def shard(self) -> tuple[int, int]:
        """(part, parts) of W_g's classes this rank holds: the group's ranks split them in the paper's layout;
        (0, 1), every class, when every rank holds every head (one group)."""
        return (self.part, self.parts) if self.groups > 1 else (0, 1)


def layout_for(targets: Targets, rank: int, world_size: int) -> Layout:
    """The paper's layout (a group per super-class) when the ranks divide evenly, else one group of all ranks."""
    groups = targets.super_classes
    if world_size > 1 and groups > 1 and world_size % groups == 0:
        parts = world_size // groups
        return Layout(groups, rank // parts, rank % parts, parts)
    return Layout(1, 0, rank, world_size)


def group_sampler(targets: Targets, layout: Layout, clusters: pd.DataFrame, seed: int) -> UniformClusterSampler:
    """Uniform over the clusters of this rank's group: its super-cluster's images at its rotation."""
    flat = clusters["super_cluster"].to_numpy() * (clusters["sub_cluster"].max() + 1) + clusters["sub_cluster"]
    images, rotations = None, list(range(ROTATIONS)) if targets.rotates else [0]
    if layout.groups > 1:  # super-class g = (super-cluster g // 4, rotation g % 4); RotNet: rotation g
        rotations = [layout.group % ROTATIONS]
        if targets.method == "deepercluster":
            images = np.flatnonzero(clusters["super_cluster"].to_numpy() == layout.group // ROTATIONS)
    group_seed = derived_seed(seed, layout.group)
    return UniformClusterSampler(
        flat.to_numpy(), rotations=rotations, seed=group_seed, images=images, draws=len(clusters) // layout.groups
    )


class RotatedImages(Dataset):
    """Item (index, rotation, sample_seed) -> (augmented image turned by rotation x 90 degrees, index, rotation)."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        index, rotation, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the transforms'): torch.manual_seed would also queue a CUDA/XPU/MPS
            # seeding, formatting a stack trace for each, and reseed the GPU's dropout generator
            torch.default_generator.manual_seed(sample_seed)
            image, _ = self.images[index]
        return torch.rot90(image, rotation, dims=(1, 2)), index, rotation


class RankBatches(Sequence):
    """This rank's share of each of the group's batches from batch ``start`` on, as (index, rotation, sample_seed).

    Batches are made when asked for, so an epoch costs no Python work per sample up front; each
    sample's augmentation seed is a splitmix64 key of (seed, epoch, group, position), vectorised.
    The last incomplete batch is dropped.
    """

    def __init__(
        self, indices: np.ndarray, rotations: np.ndarray, group_batch: int, layout: Layout, start: int, seed: int,
        epoch: int,
    ) -> None:  # fmt: skip
        self.indices, self.rotations, self.group_batch, self.start = indices, rotations, group_batch, start
        self.share = group_batch // layout.parts
        self.offset = layout.part * self.share
        self.stream = derived_seed(seed, epoch, layout.group)

    def __len__(self) -> int:
        return len(self.indices) // self.group_batch - self.start

    def __getitem__(self, b: int) -> list[tuple[int, int, int]]:
        if not 0 <= b < len(self):
            raise IndexError(b)
        first = (self.start + b) * self.group_batch + self.offset
        positions = np.arange(first, first + self.share)
        seeds = id_hash(positions, self.stream)
        return list(
            zip(self.indices[positions].tolist(), self.rotations[positions].tolist(), seeds.tolist(), strict=True)
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cluster_table(manifest: pd.DataFrame, labels: str | None) -> pd.DataFrame:
    """super_cluster and sub_cluster of every manifest row (all zero without labels: RotNet)."""
    if labels is None:
        return pd.DataFrame({"super_cluster": 0, "sub_cluster": 0}, index=manifest.index)
    table = read_labels(labels).set_index("id").reindex(manifest["id"])
    if table.isna().any().any():
        raise TrainingInputError(f"{labels} lacks some images of the manifest: rerun the round's labels stage")
    return table.reset_index(drop=True).astype(np.int64)


class MetricsLog:
    """The running log, one row per iteration (rank 0 writes); on resume, rows past the checkpoint are dropped.

    ``publish`` copies it, when the block ends, to the declared output (written atomically).
    """

    def __init__(self, path: Path, resume_at: int) -> None:
        self.path, self.file = path, None
        if not is_main_process():
            return
        rows = pd.read_csv(path, sep="\t") if path.exists() and resume_at else pd.DataFrame(columns=METRICS)
        rows[rows["iteration"] < resume_at].to_csv(path, sep="\t", index=False)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by publish())
        self.writer = csv.DictWriter(self.file, METRICS, delimiter="\t")

    def write(self, **row: float) -> None:
        if self.file:
            self.writer.writerow(row)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def publish(self, out: Path) -> None:
        if self.file:
            self.file.close()
            with atomic_output(out) as partial:
                shutil.copyfile(self.path, partial)


def mean_over_ranks(values: dict[str, torch.Tensor], stop: bool, world_size: int) -> tuple[dict[str, float], bool]:
    """Each loss and accuracy averaged over the ranks, and whether any rank was told to ``stop``, in one
    all-reduce: every rank then stops at the same iteration."""
    flag = torch.tensor(float(stop), device=values["loss"].device)
    stacked = all_reduce_sum(torch.stack([*(v.detach().float() for v in values.values()), flag]))
    return dict(zip(values, (stacked[:-1] / world_size).tolist(), strict=True)), bool(stacked[-1] > 0)


class Preemption:
    """SIGUSR2, SLURM's warning before a pre-emption or time-out, acted on at the next iteration boundary.

    Inside a submitit job the signal's handler is submitit's ``checkpoint_and_try_requeue``
    (checkpoint, ``scontrol requeue``, exit), which would requeue mid-iteration and lose the
    work since the last save. Ours only notes the signal; ``hand_over`` calls submitit's once
    last.pt is saved. Outside a submitit job (no handler to keep) the signal is left alone.
    """

    def __init__(self) -> None:
        self.signalled = False
        self.submitit = signal.getsignal(signal.SIGUSR2)
        if callable(self.submitit):
            signal.signal(signal.SIGUSR2, self.note)

    def note(self, signum: int, frame: object) -> None:
        self.signalled = True

    def hand_over(self) -> None:
        """Submitit's handler: rank 0 requeues the job and exits; the other ranks then leave too."""
        self.submitit(signal.SIGUSR2, None)
        sys.exit(0)

    def restore(self) -> None:
        if callable(self.submitit):
            signal.signal(signal.SIGUSR2, self.submitit)


def block_provenance(
    *, manifest: str, previous_checkpoint: str, labels: str | None, method: str, world_size: int, **settings: Any
) -> dict[str, Any]:
    """What the block's result depends on: its inputs' sha256, the method, the number of ranks and every
    setting but ``workers`` and ``checkpoint_every``. A last.pt is resumed only when this is equal."""
    inputs = {"manifest": manifest, "previous": previous_checkpoint, "labels": labels}
    hashes = {f"{name}_sha256": path and sha256(path) for name, path in inputs.items()}
    return {**hashes, "method": method, "world_size": world_size, **settings}


@dataclass(frozen=True)
class BlockState:
    """What last.pt restores by name: the ``shared`` modules every rank holds (model, super-class head,
    their optimiser) and the ``held`` ones only this rank's training group holds (its sub-class heads
    and their optimiser)."""

    shared: dict[str, Any]
    held: dict[str, Any]


def present(**modules: Any) -> dict[str, Any]:
    """``modules`` but those that are None (DeepCluster has no super-class head, RotNet no sub-class heads)."""
    return {name: module for name, module in modules.items() if module is not None}


def group_file(last: Path, layout: Layout, epoch: int, batch: int) -> Path:
    """The file of this rank's ``held`` state saved with last.pt at (``epoch``, ``batch``): its training group's,
    or, when the group's ranks split W_g, its part's."""
    part, parts = layout.shard
    return last.with_name(f"last-group{layout.group}{f'-part{part}' if parts > 1 else ''}-epoch{epoch}-batch{batch}.pt")


def save_state(
    last: Path, state: BlockState, layout: Layout, provenance: dict[str, Any], epoch: int, batch: int
) -> None:
    """last.pt (rank 0): the ``shared`` state, every rank's RNG state, the position (``batch`` of ``epoch``
    runs next) and the provenance; and each group's file (the group's first rank), or each part's
    when the group's ranks split W_g (every rank): its ``held`` state. Every rank calls it.

    A group's file is named by the position and written before last.pt, and the older ones are removed
    once last.pt no longer names them: a kill at any point leaves a last.pt whose group files exist.
    """
    own = group_file(last, layout, epoch, batch)
    writes = layout.part == 0 or layout.shard[1] > 1
    if writes:
        save_checkpoint(own, {**{k: v.state_dict() for k, v in state.held.items()}, "provenance": provenance})
    rngs = all_gather_objects(rng_state())  # a collective: once it returns, every group's file is written
    if is_main_process():
        shared = {k: v.state_dict() for k, v in state.shared.items()}
        save_checkpoint(last, {**shared, "rng": rngs, "epoch": epoch, "batch": batch, "provenance": provenance})
    barrier()
    if writes:
        for older in set(last.parent.glob(own.name.replace(f"-epoch{epoch}-batch{batch}", "-*"))) - {own}:
            older.unlink()


def resume_state(
    last: Path, state: BlockState, layout: Layout, provenance: dict[str, Any], rank: int
) -> tuple[int, int]:
    """(epoch, batch) to start at: restored from last.pt and this rank's group file when they were written
    for this very block, else (0, 0), saying which settings differ."""
    if not last.exists():
        return 0, 0
    shared = load_checkpoint(last)
    saved = shared.get("provenance", {})
    if saved != provenance:
        changed = [k for k in sorted({*saved, *provenance}) if saved.get(k) != provenance.get(k)]
        differences = ", ".join(f"{k} {saved.get(k)} -> {provenance.get(k)}" for k in changed)
        log.warning("%s is not resumed: it was written for another block (%s); starting afresh", last, differences)
        return 0, 0
    own = group_file(last, layout, shared["epoch"], shared["batch"])
    held = load_checkpoint(own) if own.exists() else {}
    if held.get("provenance") != provenance:
        log.warning("%s is not resumed: its training group's file %s is missing or of another block; starting afresh",
                    last, own)  # fmt: skip
        return 0, 0
    for name, module in {**state.shared, **state.held}.items():
        module.load_state_dict({**shared, **held}[name])
    set_rng_state(shared["rng"][rank])
    return shared["epoch"], shared["batch"]


def train_block(
    *,
    manifest: str,
    previous_checkpoint: str,
    out: str,
    train_dir: str,
    method: str,
    round: int,
    labels: str | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    dropout: float = 0.5,
    image_size: int = 32,
    min_crop_scale: float = 0.08,
    workers: int = 0,
    checkpoint_every: int = 1000,
    seed: int = 0,
) -> None:
    """Stage 'train' (inside its launcher): round ``round``'s training block; writes ``out``.

    ``batch_size`` is the global batch, split evenly over the ranks. ``out`` holds the backbone
    the next round starts from, and the heads rank 0 holds: every head when ranks are fewer
    than training groups; the super-class head and its part of W_0 in the paper's layout.
    """
    # Ranks: one process, or every task of the job.
    context = init_distributed()
    device, rank, world_size = context.device, context.rank, context.world_size
    if batch_size % world_size:
        raise TrainingInputError(
            f"config train.batch_size {batch_size} is not a multiple of the {world_size} ranks "
            "(resources.train.tasks): change either"
        )
    last = Path(train_dir) / "last.pt"
    Path(train_dir).mkdir(parents=True, exist_ok=True)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "seed": seed,
                "weight_decay": weight_decay, "dropout": dropout, "image_size": image_size,
                "min_crop_scale": min_crop_scale}  # fmt: skip
    provenance = block_provenance(manifest=manifest, previous_checkpoint=previous_checkpoint, labels=labels,
                                  method=method, world_size=world_size, **settings)  # fmt: skip

    # Data: the images, their clusters, this rank's group and a sampler uniform over its clusters.
    images = read_manifest(manifest)
    clusters = cluster_table(images, labels if methods.clusters(method) else None)
    targets = targets_for(method, clusters.groupby("super_cluster")["sub_cluster"].max().add(1).tolist())
    layout = layout_for(targets, rank, world_size)
    group = group_of_ranks(layout.parts)  # the ranks holding this rank's sub-class heads (None: all)
    sampler = group_sampler(targets, layout, clusters, seed)
    group_batch = min(batch_size // layout.groups, len(sampler))
    iterations_per_epoch = len(sampler) // group_batch
    augment = train_transform(image_size, min_crop_scale)
    dataset = RotatedImages(ImageDataset(images["path"].tolist(), images["id"].tolist(), augment))
    super_clusters, sub_clusters = (torch.tensor(clusters[c].to_numpy()) for c in ("super_cluster", "sub_cluster"))

    # Networks and optimisers: the backbone carries over, the heads are new each round; this rank holds
    # the sub-class heads of its group's super-class, or all of them when its group is every super-class.
    model, previous = load_model(previous_checkpoint)
    torch.manual_seed(seed)  # the same heads on every rank
    heads = Heads(model.feature_dim, targets, holds=[layout.group] if layout.groups > 1 else None,
                  shard=layout.shard, group=group)  # fmt: skip
    torch.manual_seed(derived_seed(seed, rank))  # each rank's dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    model = global_batchnorm(model)
    model.to(device).train()
    heads.to(device).train()
    held = list(heads.sub_class.parameters())
    held_ids = {id(p) for p in held}
    shared = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad and id(p) not in held_ids]
    # Gradients averaged over each set of ranks holding the weights: one all-reduce when that is every rank.
    # A part of W_g needs none: its backward saw every row of the group, so its gradient is already the sum
    # over the group's ranks, divided by their number into the average.
    parts = layout.shard[1]
    if group is None:
        reductions = [(shared + held, None)]
    else:
        reductions = [(shared, None), (held, group)] if parts == 1 else [(shared, None)]
    summed = held if parts > 1 else []
    sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    optimizer = torch.optim.SGD(shared, **sgd)
    held_optimizer = torch.optim.SGD(held, **sgd) if held else None
    optimizers = [optimizer, *present(held=held_optimizer).values()]

    # Resume by name from train/last.pt (and this group's file) when it was written for this very block.
    state = BlockState(
        shared=present(model=model, super_class=heads.super_class, optimizer=optimizer),
        held=present(sub_class=heads.sub_class, sub_class_optimizer=held_optimizer),
    )
    start_epoch, start_batch = resume_state(last, state, layout, provenance, rank)
    if (start_epoch, start_batch) != (0, 0):
        log.info("resuming round %d at epoch %d, batch %d from %s", round, start_epoch, start_batch, last)
    iteration = start_epoch * iterations_per_epoch + start_batch
    metrics = MetricsLog(Path(train_dir) / "running-metrics.tsv", resume_at=iteration)
    preemption = Preemption()

    # The loop.
    log.info("round %d: %s on %d images, %d epochs x %d iterations of %d on %d ranks (%s), heads %s", round, method,
             len(dataset), epochs, iterations_per_epoch, batch_size, world_size, layout, targets)  # fmt: skip
    log.info("rank %d holds sub-class heads [%s] (part %d of %d): %d parameters", rank, ",".join(heads.sub_class),
             *layout.shard, sum(p.numel() for p in held))  # fmt: skip
    for epoch in range(start_epoch, epochs):
        indices, rotations = sampler.epoch(epoch)
        batches = RankBatches(indices, rotations, group_batch, layout, start_batch, seed, epoch)
        # Its own generator: creating the loader must not draw from the global RNG (dropout's), or a
        # loader created at resume would shift every later draw.
        loader = DataLoader(
            dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        tick = time.perf_counter()
        for batch, (x, index, rotation) in enumerate(loader, start=start_batch):
            x, rotation = x.to(device, non_blocking=True), rotation.to(device)
            super_target = super_class(targets, super_clusters[index].to(device), rotation)
            losses = heads(model(x), super_target, sub_clusters[index].to(device))
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            losses["loss"].backward()
            for parameters, ranks in reductions:
                synchronise_gradients(parameters, ranks)
            for p in summed:
                p.grad /= parts
            for o in optimizers:
                o.step()

            row, stop = mean_over_ranks(losses, preemption.signalled, world_size)
            now, iteration = time.perf_counter(), iteration + 1
            metrics.write(round=round, epoch=epoch, iteration=iteration - 1, lr=lr,
                          images_per_s=len(x) * world_size / (now - tick), **row)  # fmt: skip
            tick = now
            if iteration % checkpoint_every == 0 or stop:
                metrics.flush()
                save_state(last, state, layout, provenance, epoch, batch + 1)
            if stop:
                log.warning("pre-emption signal: saved %s at epoch %d, batch %d; requeuing", last, epoch, batch + 1)
                preemption.hand_over()
            if batch % max(1, iterations_per_epoch // 5) == 0 or batch + 1 == iterations_per_epoch:
                log.info("epoch %d/%d batch %d/%d: %s", epoch + 1, epochs, batch + 1, iterations_per_epoch,
                         " ".join(f"{k} {v:.3f}" for k, v in row.items()))  # fmt: skip
        metrics.flush()
        start_batch = 0
        save_state(last, state, layout, provenance, epoch + 1, 0)
    preemption.restore()
    metrics.publish(Path(train_dir) / "metrics.tsv")

    if is_main_process():
        final = {"arch": previous["arch"], "sobel": previous["sobel"], "round": round, "model": model.state_dict()}
        save_checkpoint(out, {**final, "heads": heads.state_dict(), "targets": asdict(targets), **provenance})
        log.info("round %d's block done: %s", round, out)
