"""SLURM's warning before a pre-emption or time-out (SIGUSR2), acted on at the next iteration boundary."""

from __future__ import annotations

import signal
import sys


class Preemption:
    """SIGUSR2, noted by the handler and acted on by the loop once last.pt is saved.

    Inside a submitit job the signal's handler is submitit's ``checkpoint_and_try_requeue``
    (checkpoint, ``scontrol requeue``, exit), which would requeue mid-iteration and lose the
    work since the last save. Ours only notes the signal; ``hand_over`` calls submitit's once
    last.pt is saved. Outside a submitit job (no handler to keep) the signal is left alone.
    Used as a context manager, it gives submitit's handler back on leaving.
    """

    def __init__(self) -> None:
        self.signalled = False
        self.submitit = signal.getsignal(signal.SIGUSR2)

    def __enter__(self) -> Preemption:
        if callable(self.submitit):
            signal.signal(signal.SIGUSR2, self.note)
        return self

    def __exit__(self, *exc: object) -> None:
        if callable(self.submitit):
            signal.signal(signal.SIGUSR2, self.submitit)

    def note(self, signum: int, frame: object) -> None:
        self.signalled = True

    def hand_over(self) -> None:
        """Submitit's handler: rank 0 requeues the job and exits; the other ranks then leave too."""
        self.submitit(signal.SIGUSR2, None)
        sys.exit(0)
