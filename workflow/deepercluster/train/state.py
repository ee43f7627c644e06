"""A training block's state, saved to ``train/last.pt`` and resumed exactly, but only for the same block.

last.pt holds the ``shared`` objects every rank holds (model, super-class head, their optimiser) by name,
every rank's RNG state, the position (``batch`` of ``epoch`` runs next) and the block's provenance; each
training group's ``held`` objects (its sub-class heads and their optimiser) are in a file of the group's
beside it (of each part of the group, when its ranks split W_g).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deepercluster.checkpoints import load_checkpoint, non_finite_weights, save_checkpoint
from deepercluster.distributed import all_gather_objects, barrier, is_main_process
from deepercluster.files import sha256
from deepercluster.train.batches import Layout
from deepercluster.train.settings import BlockSettings

log = logging.getLogger(__name__)


def block_provenance(
    *,
    manifest: str,
    previous_checkpoint: str,
    labels: str | None,
    method: str,
    world_size: int,
    settings: BlockSettings,
) -> dict[str, Any]:
    """What the block's result depends on: its inputs' sha256, the method, the number of ranks and its settings
    (every field of ``BlockSettings``, not ``workers`` nor ``checkpoint_every``). A last.pt is resumed only when
    this is equal."""
    inputs = {"manifest": manifest, "previous": previous_checkpoint, "labels": labels}
    hashes = {f"{name}_sha256": path and sha256(path) for name, path in inputs.items()}
    return {**hashes, "method": method, "world_size": world_size, **asdict(settings)}


@dataclass(frozen=True)
class BlockState:
    """What last.pt restores by name: the ``shared`` objects every rank holds (model, super-class head,
    their optimiser) and the ``held`` ones only this rank's training group holds (its sub-class heads
    and their optimiser). Absent objects (DeepCluster has no super-class head) are left out."""

    shared: dict[str, Any]
    held: dict[str, Any]

    def non_finite(self, look: bool) -> dict[str, bool]:
        """Whether each object holds a NaN or an infinity (a weight, a BatchNorm statistic, a momentum buffer);
        all False, unread, when not ``look``."""
        objects = {**self.shared, **self.held}
        return {name: look and bool(non_finite_weights(o.state_dict())) for name, o in objects.items()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def group_file(last: Path, layout: Layout, epoch: int, batch: int) -> Path:
    """The file of this rank's ``held`` state saved with last.pt at (``epoch``, ``batch``): its training group's,
    or, when the group's ranks split W_g, its part's."""
    part, parts = layout.head_part
    return last.with_name(f"last-group{layout.group}{f'-part{part}' if parts > 1 else ''}-epoch{epoch}-batch{batch}.pt")


def save_state(
    last: Path, state: BlockState, layout: Layout, provenance: dict[str, Any], epoch: int, batch: int
) -> None:
    """last.pt (rank 0): the ``shared`` state, every rank's RNG state, the position and the provenance; and
    each group's file (the group's first rank), or each part's when the group's ranks split W_g (every
    rank): its ``held`` state. Every rank calls it.

    A group's file is named by the position and written before last.pt, and the older ones are removed
    once last.pt no longer names them: a kill at any point leaves a last.pt whose group files exist.
    """
    own = group_file(last, layout, epoch, batch)
    writes = layout.part == 0 or layout.head_part[1] > 1
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
        log.warning(
            "%s is not resumed: its training group's file %s is missing or of another block; starting afresh", last, own
        )
        return 0, 0
    for name, module in {**state.shared, **state.held}.items():
        module.load_state_dict({**shared, **held}[name])
    set_rng_state(shared["rng"][rank])
    return shared["epoch"], shared["batch"]
