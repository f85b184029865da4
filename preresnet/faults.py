"""Stopping a run on request: SIGTERM (schedulers, torchrun, preemption notices), SIGINT (Ctrl-C) and
SIGUSR1 (a common choice for SLURM's --signal).

The first such signal only records itself: the training loop stops at the next step boundary at
which every process agrees (training.train_epoch), writes a checkpoint holding its position inside
the epoch and ends the run with Interrupted, whose exit status is the shell's 128 + signal number.
Stopping inside the handler instead would leave the other processes waiting in a collective and
could cut a step in half. In a single process a second signal interrupts at once
(KeyboardInterrupt), for a user who will not wait; the last checkpoint is still whole, as every
write is atomic. Under torchrun a process often gets the signal twice (from the terminal or the
scheduler, and forwarded by torchrun), so repeats are ignored there: torchrun itself ends its
processes with SIGKILL 30 s after forwarding a signal.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_received: int | None = None  # the first stop signal since stop_on_signals() was entered


class Interrupted(Exception):
    """The run stopped on a signal after writing its checkpoint (or with the last one already current)."""

    def __init__(self, signum: int | None, epoch: int, step: int, steps: int, out):
        """epoch: epochs done; step: steps done of the next one, of steps; out: the run folder."""
        # a process that did not receive the signal itself stopped because another one did
        self.signum = signum or signal.SIGTERM
        self.exit_status = 128 + self.signum
        if step:
            where = f"in epoch {epoch + 1} after step {step} of {steps}, checkpoint written"
        elif epoch:
            where = f"after epoch {epoch}, checkpoint written"
        else:
            where = "before the first step, nothing trained yet"
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} {where}; continue with --resume {out} "
                         f"(or the same command with --resume auto)")


def stop_requested() -> int | None:
    """The stop signal received, if any (a flag read: no system call, no device synchronisation)."""
    return _received


@contextlib.contextmanager
def stop_on_signals(repeat_interrupts: bool = True):
    """Within this block the first stop signal is recorded for the training loop to act on, a
    second one raises KeyboardInterrupt where repeat_interrupts (else it is ignored); the previous
    handlers are restored on exit."""
    global _received

    def record(signum, frame):
        global _received
        if _received is None:
            _received = signum
        elif repeat_interrupts:
            raise KeyboardInterrupt

    _received = None
    previous = {signum: signal.signal(signum, record) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received = None
