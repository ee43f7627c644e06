"""The block's per-iteration log (``formats.metrics``, written by rank 0, and the same rows as TensorBoard events),
and the losses averaged over ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from deepercluster.distributed import all_reduce_sum, is_main_process
from deepercluster.formats.metrics import COLUMNS, MetricsWriter

# The columns drawn as TensorBoard curves, by their names in the log; the others (round, epoch, iteration) place them.
CURVES = tuple(c for c in COLUMNS if c not in ("round", "epoch", "iteration"))


class MetricsLog:
    """The running log, one row per iteration, kept by rank 0 (the other ranks' calls do nothing); on resume, rows
    past the checkpoint are dropped. The same rows go to TensorBoard events beside it (the round's ``train/``:
    ``tensorboard --logdir results``), each value at its iteration, flushed with the log; a block starting or
    resuming writes its events anew from the log's kept rows, so the curves hold the log's rows whatever a killed
    run had written. ``publish`` copies the log, when the block ends, to the declared output."""

    def __init__(self, path: Path, resume_at: int) -> None:
        main = is_main_process()
        self.writer = MetricsWriter(path, resume_at) if main else None
        self.events = replayed_events(path.parent, self.writer.kept) if main else None

    def write(self, **row: float) -> None:
        if self.writer:
            self.writer.write(row)
            add_curves(self.events, row)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()
            self.events.flush()

    def publish(self, out: Path) -> None:
        if self.writer:
            self.events.close()
            self.writer.publish(out)


def replayed_events(folder: Path, kept: pd.DataFrame) -> SummaryWriter:
    """A new TensorBoard events file in ``folder`` holding the running log's ``kept`` rows; the earlier files (a
    killed run's, with its iterations past the last save) removed first. One file, so no reader has to order a
    killed run's and its resumption's files (their names sort by the second they were opened, then by pid)."""
    for earlier in folder.glob("events.out.tfevents.*"):
        earlier.unlink()
    events = SummaryWriter(str(folder))
    for row in kept.to_dict("records"):
        add_curves(events, {name: value for name, value in row.items() if not math.isnan(value)})
    return events


def add_curves(events: SummaryWriter, row: dict[str, float]) -> None:
    """The ``CURVES`` of a log's ``row`` as scalars at its iteration (a head the method lacks: no scalar)."""
    for name in CURVES:
        if name in row:
            events.add_scalar(name, row[name], int(row["iteration"]))


def mean_over_ranks(
    values: dict[str, torch.Tensor], flags: dict[str, bool], world_size: int
) -> tuple[dict[str, float], set[str]]:
    """Each loss and accuracy averaged over the ranks, and which of ``flags`` any rank raised (the pre-emption
    signal, non-finite weights), in one all-reduce: every rank then acts on them at the same iteration."""
    flagged = torch.tensor([float(flag) for flag in flags.values()], device=values["loss"].device)
    stacked = all_reduce_sum(torch.cat([torch.stack([v.detach().float() for v in values.values()]), flagged]))
    means, raised = (stacked[: len(values)] / world_size).tolist(), stacked[len(values) :].tolist()
    return dict(zip(values, means, strict=True)), {name for name, n in zip(flags, raised, strict=True) if n > 0}


HEAD_LOSSES = {"loss_super": "the super-class head V", "loss_sub": "the sub-class heads W_s", "loss": "the heads"}


def diverged_heads(row: dict[str, float]) -> str:
    """Whose loss in an iteration's ``row`` (averaged over the ranks: NaN when any rank's is) is NaN or infinite
    ("the loss of the super-class head V is nan (loss_super)"), or '' when every loss is finite."""
    bad = [k for k in HEAD_LOSSES if k in row and not math.isfinite(row[k])]
    heads = [k for k in bad if k != "loss"] or bad
    return " and ".join(f"the loss of {HEAD_LOSSES[k]} is {row[k]} ({k})" for k in heads)
