"""The training block of a round: ``epochs`` epochs on the round's pseudo-labels, resumable exactly.

``train_block`` reads top to bottom as the paper's block: data (``batches``), networks, optimisers, resume
(``state``), epochs. It saves ``train/last.pt`` every ``checkpoint_every`` iterations, at every epoch end, and
at the iteration where the pre-emption signal arrives (``preemption``), before handing over to submitit to
requeue the job. Run again after a kill, it resumes from there and ends with the same weights as an
uninterrupted run, when last.pt was written for the same block (``state.block_provenance``).

The backbone and the super-class head are held by all ranks and their gradients averaged over all; the
sub-class head W_g only by its training group's ranks (a process group per group), each holding 1/p of its
classes in the paper's layout (the softmax over them all taken inside the group: ``nn.heads``). BatchNorm
statistics are computed over the global batch (``nn.layers``), so the ranks holding a weight hold it
identically and one rank computes what many do.

The per-iteration log is kept beside last.pt (``running-metrics.tsv``, cut back to the resume point on
resume); ``metrics.tsv``, the rule's declared output, is written from it when the block ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepercluster import methods
from deepercluster.checkpoints import load_model, model_checkpoint, provenance_of, save_checkpoint
from deepercluster.data.images import ImageDataset, network_input, train_transform
from deepercluster.distributed import (
    Distributed,
    group_of_ranks,
    init_distributed,
    is_main_process,
    synchronise_gradients,
)
from deepercluster.errors import TrainingInputError
from deepercluster.formats.labels import labels_file
from deepercluster.formats.manifest import manifest_size
from deepercluster.logs import code_version
from deepercluster.methods import Method
from deepercluster.nn.heads import Heads, Targets, targets_for
from deepercluster.nn.layers import global_batchnorm
from deepercluster.seeds import derived_seed
from deepercluster.train.batches import (
    Layout,
    RankBatches,
    RotatedImages,
    group_images,
    group_sampler,
    layout_for,
)
from deepercluster.train.metrics import MetricsLog, diverged_heads, mean_over_ranks
from deepercluster.train.preemption import Preemption
from deepercluster.train.sampler import UniformClusterSampler
from deepercluster.train.settings import BlockSettings
from deepercluster.train.state import BlockState, block_provenance, resume_state, save_state

log = logging.getLogger(__name__)

SPLIT = ("super_cluster", "sub_cluster")
STOP = "pre-emption signal"


@dataclass
class BlockData:
    """This rank's data: the images, each one's super- and sub-cluster, the targets, the ranks' layout, the
    process group of this rank's sub-class heads (None: all ranks) and a sampler uniform over its clusters."""

    method: Method
    dataset: RotatedImages
    super_clusters: torch.Tensor
    sub_clusters: torch.Tensor
    targets: Targets
    layout: Layout
    group: torch.distributed.ProcessGroup | None
    sampler: UniformClusterSampler
    group_batch: int

    @property
    def iterations_per_epoch(self) -> int:
        return len(self.sampler) // self.group_batch


def block_data(
    manifest: str, labels: str | None, method: Method, context: Distributed, settings: BlockSettings
) -> BlockData:
    labels = labels if method.labelled else None
    targets = targets_for(method, labels_file(labels)[1] if labels else [1])
    layout = layout_for(targets, context.rank, context.world_size)
    group = group_of_ranks(layout.parts)  # a collective: every rank makes every group's
    images, clusters = group_images(manifest, labels, method, layout)
    augment = train_transform(settings.image_size, settings.min_crop_scale)
    dataset = RotatedImages(ImageDataset(images, augment))
    del images  # read into arrow's memory pool, which keeps the pages it frees: handed back, not held all block
    pa.default_memory_pool().release_unused()
    sampler = group_sampler(method, layout, clusters, manifest_size(manifest), settings.seed)
    super_clusters, sub_clusters = (torch.tensor(clusters.table[c].to_numpy()) for c in SPLIT)
    group_batch = min(settings.batch_size // layout.groups, len(sampler))
    return BlockData(method, dataset, super_clusters, sub_clusters, targets, layout, group, sampler, group_batch)


def continues(previous: dict[str, Any], data: BlockData) -> bool:
    """Whether the previous checkpoint is the previous round of the same method (not a start from another's, as
    DeeperCluster's from a RotNet, nor the random init): then the backbone's optimiser state carries over."""
    return provenance_of(previous).get("method") == data.method.name and "optimizers" in previous


def keeps_heads(previous: dict[str, Any], data: BlockData) -> bool:
    """Whether the previous round's heads carry over: a method whose classes mean the same every round (RotNet,
    supervised), continuing its own previous round of the same targets."""
    return data.method.keeps_heads and continues(previous, data) and previous["targets"] == asdict(data.targets)


def block_networks(
    previous_checkpoint: str, data: BlockData, settings: BlockSettings, context: Distributed
) -> tuple[nn.Module, Heads, dict[str, Any]]:
    """The backbone of the previous checkpoint (global-batch BatchNorm, the block's dropout) and the heads: this
    rank's sub-class heads of its group's super-class, or all of them when its group is every super-class; new
    each round, or the previous round's where they carry over (``keeps_heads``)."""
    model, previous = load_model(previous_checkpoint)
    torch.manual_seed(settings.seed)  # the same heads on every rank
    layout = data.layout
    heads = Heads(
        model.feature_dim,
        data.targets,
        holds=[layout.group] if layout.groups > 1 else None,
        part=layout.head_part,
        group=data.group,
    )
    if keeps_heads(previous, data):
        heads.load_state_dict(previous["heads"])
        log.info("the heads carry over from %s", previous_checkpoint)
    torch.manual_seed(derived_seed(settings.seed, context.rank))  # each rank's dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = settings.dropout
    model = global_batchnorm(model).to(context.device).train()
    return model, heads.to(context.device).train(), previous


class Optimisers:
    """SGD on the backbone (``settings.momentum``), on V and on this rank's W_g (``head_momentum``), with each
    gradient averaged over the ranks holding its weight: one all-reduce when that is every rank. A part of W_g
    needs none: its backward saw every row of the group, so its gradient is already the sum over the group's
    ranks, divided by their number into the average."""

    def __init__(self, model: nn.Module, heads: Heads, data: BlockData, settings: BlockSettings) -> None:
        self.backbone = [p for p in model.parameters() if p.requires_grad]
        self.super_class = list(heads.super_class.parameters()) if heads.super_class is not None else []
        self.held = list(heads.sub_class.parameters())
        self.parts = data.layout.head_part[1]
        shared = self.backbone + self.super_class
        if data.group is None:
            self.reductions = [(shared + self.held, None)]
        else:
            self.reductions = [(shared, None), *([(self.held, data.group)] if self.parts == 1 else [])]
        lr, weight_decay = settings.lr, settings.weight_decay
        self.optimizer = torch.optim.SGD(self.backbone, lr=lr, momentum=settings.momentum, weight_decay=weight_decay)
        heads_sgd = {"lr": lr, "momentum": settings.head_momentum, "weight_decay": weight_decay}
        self.super_class_optimizer = torch.optim.SGD(self.super_class, **heads_sgd) if self.super_class else None
        self.held_optimizer = torch.optim.SGD(self.held, **heads_sgd) if self.held else None

    def by_name(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers present, by the name a checkpoint keeps each one's state under."""
        return optional(backbone=self.optimizer, super_class=self.super_class_optimizer, sub_class=self.held_optimizer)

    def carry_over(self, previous: dict[str, Any], data: BlockData) -> None:
        """The previous round's optimiser state, where it continues the same method (``continues``): the
        backbone's (the papers' code makes its optimiser once), and the heads' where they carried over. Only the
        state (momentum buffers) carries: lr, momentum and weight decay stay this block's, which torch's
        ``load_state_dict`` would otherwise replace with the previous round's (a RotNet continued at another lr)."""
        if not continues(previous, data):
            return
        carried = self.by_name() if keeps_heads(previous, data) else {"backbone": self.optimizer}
        for name, optimizer in carried.items():
            own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(previous["optimizers"][name])
            for group, settings in zip(optimizer.param_groups, own, strict=True):
                group.update(settings)

    def step(self, loss: torch.Tensor) -> None:
        optimizers = list(self.by_name().values())
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for parameters, ranks in self.reductions:
            synchronise_gradients(parameters, ranks)
        for p in self.held if self.parts > 1 else []:
            p.grad /= self.parts
        for o in optimizers:
            o.step()


@dataclass
class Loop:
    """What the epochs share: the networks, their optimisers and state, and where and how often to save."""

    round: int
    data: BlockData
    model: nn.Module
    heads: Heads
    optimisers: Optimisers
    state: BlockState
    last: Path
    provenance: dict[str, Any]
    metrics: MetricsLog
    context: Distributed
    settings: BlockSettings
    checkpoint_every: int
    workers: int


def train_block(
    *,
    manifest: str,
    previous_checkpoint: str,
    out: str,
    train_dir: str,
    method: str,
    round: int,
    labels: str | None = None,
    settings: BlockSettings,
    workers: int,
    checkpoint_every: int,
) -> None:
    """Stage 'train' (inside its launcher): round ``round``'s training block with ``settings``; writes ``out``.

    ``settings.batch_size`` is the global batch, split evenly over the ranks. ``out`` holds the backbone the next
    round starts from, and the heads rank 0 holds: every head when ranks are fewer than training groups; the
    super-class head and its part of W_0 in the paper's layout.
    """
    context = init_distributed()
    provenance = checked_provenance(manifest, previous_checkpoint, labels, method, settings, context)
    log.info("round %d's block, deepercluster %s: %s", round, code_version(), provenance)

    data = block_data(manifest, labels, methods.method(method), context, settings)
    model, heads, previous = block_networks(previous_checkpoint, data, settings, context)
    optimisers = Optimisers(model, heads, data, settings)
    optimisers.carry_over(previous, data)
    state = block_state(model, heads, optimisers)
    last = Path(train_dir) / "last.pt"
    last.parent.mkdir(parents=True, exist_ok=True)
    start_epoch, start_batch = resume_state(last, state, data.layout, provenance, context.rank)
    resume_at = start_epoch * data.iterations_per_epoch + start_batch
    metrics = MetricsLog(last.with_name("running-metrics.tsv"), resume_at=resume_at)
    loop = Loop(
        round,
        data,
        model,
        heads,
        optimisers,
        state,
        last,
        provenance,
        metrics,
        context,
        settings,
        checkpoint_every=checkpoint_every,
        workers=workers,
    )
    log_start(loop, start_epoch, start_batch)
    with Preemption() as preemption:
        for epoch in range(start_epoch, settings.epochs):
            run_epoch(loop, epoch, start_batch if epoch == start_epoch else 0, preemption)
    metrics.publish(last.with_name("metrics.tsv"))
    if is_main_process():
        save_result(out, loop, previous)


def checked_provenance(
    manifest: str,
    previous_checkpoint: str,
    labels: str | None,
    method: str,
    settings: BlockSettings,
    context: Distributed,
) -> dict[str, Any]:
    """The block's provenance (what a ``last.pt`` resumes only when equal to), once its global batch is known to
    split evenly over the ranks."""
    if settings.batch_size % context.world_size:
        raise TrainingInputError(
            f"config train.batch_size {settings.batch_size} is not a multiple of the "
            f"{context.world_size} ranks (resources.train.tasks): change either"
        )
    return block_provenance(
        manifest=manifest,
        previous_checkpoint=previous_checkpoint,
        labels=labels,
        method=method,
        world_size=context.world_size,
        settings=settings,
    )


def block_state(model: nn.Module, heads: Heads, optimisers: Optimisers) -> BlockState:
    """What ``last.pt`` saves and restores by name: the objects every rank holds, and those of this rank's group."""
    return BlockState(
        shared=optional(
            model=model,
            super_class=heads.super_class,
            optimizer=optimisers.optimizer,
            super_class_optimizer=optimisers.super_class_optimizer,
        ),
        held=optional(sub_class=heads.sub_class, sub_class_optimizer=optimisers.held_optimizer),
    )


def save_result(out: str, loop: Loop, previous: dict[str, Any]) -> None:
    """Rank 0's ``out``: the backbone the next round starts from, the heads it holds, the targets and the
    optimisers' state, with the block's provenance; arch and Sobel those of ``previous``, the checkpoint it began
    from."""
    final = {
        "model": loop.model.state_dict(),
        "heads": loop.heads.state_dict(),
        "targets": asdict(loop.data.targets),
        "optimizers": {name: o.state_dict() for name, o in loop.optimisers.by_name().items()},
    }
    checkpoint = model_checkpoint(
        arch=previous["arch"], sobel=previous["sobel"], round=loop.round, provenance=loop.provenance, **final
    )
    save_checkpoint(out, checkpoint)
    log.info("round %d's block done: %s", loop.round, out)


def optional(**objects: Any) -> dict[str, Any]:
    """``objects`` but those that are None (DeepCluster has no super-class head, RotNet no sub-class heads)."""
    return {name: value for name, value in objects.items() if value is not None}


def log_start(loop: Loop, start_epoch: int, start_batch: int) -> None:
    data = loop.data
    if (start_epoch, start_batch) != (0, 0):
        log.info("resuming round %d at epoch %d, batch %d from %s", loop.round, start_epoch, start_batch, loop.last)
    log.info(
        "round %d: %s on %d images, %d epochs x %d iterations of %d on %d ranks (%s), heads %s",
        loop.round,
        data.method.name,
        len(data.dataset),
        loop.settings.epochs,
        loop.data.iterations_per_epoch,
        loop.settings.batch_size,
        loop.context.world_size,
        data.layout,
        data.targets,
    )
    held = sum(p.numel() for p in loop.optimisers.held)
    log.info(
        "rank %d holds sub-class heads [%s] (part %d of %d): %d parameters",
        loop.context.rank,
        ",".join(loop.heads.sub_class),
        *data.layout.head_part,
        held,
    )


def refuse_divergence(
    loop: Loop, row: dict[str, float], weights: set[str], epoch: int, batch: int, iteration: int
) -> None:
    """Stop the block, on every rank at once, at an iteration whose loss is NaN or infinite, or whose state after
    its step, about to be saved, is (``weights``: the objects of any rank that are): last.pt keeps the last state
    saved, which was finite."""
    heads = diverged_heads(row)
    if not heads and not weights:
        return
    what = heads or f"{', '.join(sorted(weights))} (by last.pt's names) hold non-finite values after its step"
    raise TrainingInputError(
        f"round {loop.round}'s training block diverged at iteration {iteration} (epoch {epoch}, batch {batch}) with "
        f"lr {loop.settings.lr}: {what}; lower methods.{loop.data.method.name}.lr and rerun, which trains the block "
        f"afresh (nothing non-finite was saved: {loop.last.name} holds the last finite state, if any)"
    )


def run_epoch(loop: Loop, epoch: int, start_batch: int, preemption: Preemption) -> None:
    """One epoch from batch ``start_batch``: a step per batch, a save every ``checkpoint_every`` iterations, at
    a pre-emption signal (then handing over to submitit) and at the end."""
    data, device, per_epoch = loop.data, loop.context.device, loop.data.iterations_per_epoch
    indices, rotations = data.sampler.epoch(epoch)
    seed = loop.settings.seed
    batches = RankBatches(indices, rotations, data.group_batch, data.layout, start_batch, seed, epoch)
    # Its own generator: creating the loader must not draw from the global RNG (dropout's), or a loader created
    # at resume would shift every later draw.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data.dataset,
        batch_sampler=batches,
        num_workers=loop.workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
    tick, iteration = time.perf_counter(), epoch * per_epoch + start_batch
    for batch, (x, index, rotation) in enumerate(loader, start=start_batch):
        x, rotation = network_input(x, device), rotation.to(device)
        super_target = data.method.super_class(data.super_clusters[index].to(device), rotation)
        losses = loop.heads(loop.model(x), super_target, data.sub_clusters[index].to(device))
        loop.optimisers.step(losses["loss"])
        signalled = preemption.signalled
        saves = (iteration + 1) % loop.checkpoint_every == 0 or batch + 1 == per_epoch or signalled
        flags = {STOP: signalled, **loop.state.non_finite(look=saves)}  # a state saved must be finite
        row, raised = mean_over_ranks(losses, flags, loop.context.world_size)
        refuse_divergence(loop, row, raised - {STOP}, epoch, batch, iteration)
        stop = STOP in raised
        now, iteration = time.perf_counter(), iteration + 1
        loop.metrics.write(
            round=loop.round,
            epoch=epoch,
            iteration=iteration - 1,
            lr=loop.settings.lr,
            images_per_s=len(x) * loop.context.world_size / (now - tick),
            **row,
        )
        tick = now
        if iteration % loop.checkpoint_every == 0 or stop:
            loop.metrics.flush()
            save_state(loop.last, loop.state, data.layout, loop.provenance, epoch, batch + 1)
        if stop:
            log.warning("pre-emption signal: saved %s at epoch %d, batch %d; requeuing", loop.last, epoch, batch + 1)
            preemption.hand_over()
        if batch % max(1, per_epoch // 5) == 0 or batch + 1 == per_epoch:
            log.info(
                "epoch %d/%d batch %d/%d: %s",
                epoch + 1,
                loop.settings.epochs,
                batch + 1,
                per_epoch,
                " ".join(f"{k} {v:.3f}" for k, v in row.items()),
            )
    loop.metrics.flush()
    save_state(loop.last, loop.state, data.layout, loop.provenance, epoch + 1, 0)
