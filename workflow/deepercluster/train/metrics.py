"""The block's per-iteration log (``formats.metrics``, written by rank 0), and the losses averaged over ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from deepercluster.distributed import all_reduce_sum, is_main_process
from deepercluster.formats.metrics import MetricsWriter


class MetricsLog:
    """The running log, one row per iteration, kept by rank 0 (the other ranks' calls do nothing); on resume, rows
    past the checkpoint are dropped. ``publish`` copies it, when the block ends, to the declared output."""

    def __init__(self, path: Path, resume_at: int) -> None:
        self.writer = MetricsWriter(path, resume_at) if is_main_process() else None

    def write(self, **row: float) -> None:
        if self.writer:
            self.writer.write(row)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def publish(self, out: Path) -> None:
        if self.writer:
            self.writer.publish(out)


def mean_over_ranks(values: dict[str, torch.Tensor], stop: bool, world_size: int) -> tuple[dict[str, float], bool]:
    """Each loss and accuracy averaged over the ranks, and whether any rank was told to ``stop``, in one
    all-reduce: every rank then stops at the same iteration."""
    flag = torch.tensor(float(stop), device=values["loss"].device)
    stacked = all_reduce_sum(torch.stack([*(v.detach().float() for v in values.values()), flag]))
    return dict(zip(values, (stacked[:-1] / world_size).tolist(), strict=True)), bool(stacked[-1] > 0)
