"""The ticket counters of the fused kernels' cross-program reductions, and who owns them.

A kernel whose programs reduce across each other (the statistics merges, the split weight
gradient) counts their arrivals in int32 counters: each program takes a ticket, and the last one
merges the partials and resets its counter to zero. Two launches that run at the same time must
therefore never share counters: their tickets would mix, a merge could run before every partial is
written, or never run and leave a counter non-zero for every later launch.

As CUTLASS's split-K kernels take their semaphore workspace from the caller, the launches here take
their counters from an owner: whatever launches them and never overlaps with itself, such as a
training run's step (its eager steps, its captured graph) or a captured evaluation forward. An owner
allocates its zeroed counters before it launches anything (`new_counters`: never inside a CUDA
graph capture, which would record the zeroing and tie them to the graph's memory pool) and enters
`launching_with(counters)` around what it launches; a captured graph keeps the counters it was
captured with. A launch outside every owner (a direct call, a test, one layer's benchmark) uses the
device's default counters, and only on the device's default stream, where nothing else runs at
the same time: on another stream (a packed run, a capture) it is refused, never shared.

The active owner is process-wide, not thread-local: autograd launches the backward kernels from its
own device threads, which do not see the calling thread's locals, while the thread that called
backward() waits for them. So one thread at a time may be inside an owner; a second is refused.

Plain PyTorch (no Triton): preresnet.steps imports it without loading the kernels.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

COUNTER_SLOTS = 1 << 14  # counters per workspace; a launch needs one per output tile of its reduction

_owners: list[torch.Tensor] = []  # the counters of the owners entered, innermost last
_owner_thread: list[int] = []  # the thread that entered them (empty when none is)
_defaults: dict[torch.device, torch.Tensor] = {}  # per device, for launches outside every owner


def new_counters(device: torch.device | str) -> torch.Tensor:
    """A zeroed workspace of ticket counters for one owner (allocate it before any capture)."""
    return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)


@contextmanager
def launching_with(counters: torch.Tensor | None):
    """Every fused launch inside (its backward too) takes its tickets from counters (None: no owner)."""
    if counters is None:
        yield
        return
    thread = threading.get_ident()
    if _owner_thread and _owner_thread[0] != thread:
        raise RuntimeError("two threads launch the fused kernels at once: the owner of the ticket counters is "
                           "process-wide (autograd's threads launch the backward), so drive them from one thread")
    _owners.append(counters)
    _owner_thread[:] = [thread]
    try:
        yield
    finally:
        _owners.pop()
        if not _owners:
            _owner_thread.clear()


def counters_for_launch(device: torch.device, slots: int) -> torch.Tensor:
    """The zeroed counters a launch on device takes `slots` tickets from: the active owner's, else the
    device's default counters, on its default stream only (see the module docstring)."""
    if slots > COUNTER_SLOTS:
        raise ValueError(f"a launch needs {slots} ticket counters, more than the {COUNTER_SLOTS} of a workspace")
    if _owners:
        counters = _owners[-1]
        if counters.device != device:
            raise ValueError(f"the active ticket counters are on {counters.device}, the launch on {device}")
        return counters
    if device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        raise RuntimeError("a fused kernel launched outside the default stream needs ticket counters of its own: "
                           "enter preresnet.kernels.workspace.launching_with(new_counters(device)) around what "
                           "launches on that stream (preresnet.steps does for each run and captured graph)")
    if device not in _defaults:
        _defaults[device] = new_counters(device)
    return _defaults[device]
