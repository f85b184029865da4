"""Stopping a run on request: SIGTERM (schedulers, torchrun, preemption notices), SIGINT (Ctrl-C) and
SIGUSR1 (a common choice for SLURM's --signal).

The first such signal only records itself: the training loop stops every run at its next step
boundary at which every process agrees (training.TrainingRun.epoch_steps), writes a checkpoint
holding its position inside the epoch and ends the command with Interrupted, whose exit status is
the shell's 128 + signal number. Stopping inside the handler instead would leave the other
processes waiting in a collective and could cut a step in half. In a single process a second
signal interrupts at once (KeyboardInterrupt), for a user who will not wait; the last checkpoint is
still whole, as every write is atomic. Under torchrun a process often gets the signal twice (from
the terminal or the scheduler, and forwarded by torchrun), so repeats are ignored there: torchrun
itself ends its processes with SIGKILL 30 s after forwarding a signal.

train.py installs the handlers on its first line (install), before it imports torch: a signal
during start-up is recorded and ends the command before its first step, and one after training
has ended (finished()) is ignored, so the command finishes and exits 0. This module imports only
the standard library, so that it can come first.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_received: int | None = None  # the first stop signal since the handlers were installed
_repeat_interrupts = True  # a second signal raises KeyboardInterrupt (single process)
_finished = False  # training has ended: signals are ignored


class Interrupted(Exception):
    """The command stopped on a signal after writing its checkpoints (or with the last ones current)."""

    def __init__(self, signum: int | None, where: str):
        """where: what follows 'interrupted by SIGNAL' (the runs' positions, how to continue)."""
        # a process that did not receive the signal itself stopped because another one did
        self.signum = signum or signal.SIGTERM
        self.exit_status = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}{where}")


def stop_requested() -> int | None:
    """The stop signal received, if any (a flag read: no system call, no device synchronisation)."""
    return _received


def _record(signum, frame):
    global _received
    if _finished:
        return
    if _received is None:
        _received = signum
    elif _repeat_interrupts:
        raise KeyboardInterrupt


def install(repeat_interrupts: bool = True) -> None:
    """Handle the stop signals for the rest of the process (train.py's first line)."""
    global _received, _repeat_interrupts, _finished
    _received, _repeat_interrupts, _finished = None, repeat_interrupts, False
    # all the handlers change at once: a signal arriving in between (a SIGINT just after SIGTERM's
    # handler is set, still under Python's KeyboardInterrupt) waits and finds _record. The mask is
    # this thread's: at train.py's first line the process has no other.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _record)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def installed() -> bool:
    return signal.getsignal(signal.SIGTERM) is _record


def finished() -> None:
    """Training has ended: from now on a stop signal changes nothing (the command exits 0)."""
    global _finished
    _finished = True


@contextlib.contextmanager
def stop_on_signals(repeat_interrupts: bool = True):
    """Within this block the stop signals are handled as install() does (for train.main called from
    Python); the previous handlers are restored on exit."""
    global _received, _repeat_interrupts, _finished
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    install(repeat_interrupts)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received, _repeat_interrupts, _finished = None, True, False
