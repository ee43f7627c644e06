"""The block's per-iteration log (the columns of ``formats.metrics``), and the losses averaged over ranks."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import torch

from deepercluster.distributed import all_reduce_sum, is_main_process
from deepercluster.files import atomic_output
from deepercluster.formats.metrics import COLUMNS


class MetricsLog:
    """The running log, one row per iteration (rank 0 writes); on resume, rows past the checkpoint are dropped.

    ``publish`` copies it, when the block ends, to the declared output (written atomically).
    """

    def __init__(self, path: Path, resume_at: int) -> None:
        self.path, self.file = path, None
        if not is_main_process():
            return
        rows = pd.read_csv(path, sep="\t") if path.exists() and resume_at else pd.DataFrame(columns=COLUMNS)
        rows[rows["iteration"] < resume_at].to_csv(path, sep="\t", index=False)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed by publish())
        self.writer = csv.DictWriter(self.file, COLUMNS, delimiter="\t")

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
