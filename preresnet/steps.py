"""The training step and the evaluation forward a run calls: plain (the model may be compiled), or
on static buffers and captured in a CUDA graph (`--cuda-graphs`; the capture itself is
`preresnet.cuda_graphs`).

The capturable step copies the batch into static input and label buffers (one device-to-device
copy each), which the captured kernels read; its learning rate is a 0-dim float32 tensor on the
device that the optimizer reads (`torch.optim.SGD(fused=True)` takes a Tensor lr and reads it on
the device, with no host synchronisation); `set_lr` writes it with `fill_` outside the graph, only
when it changes, so the warm-up and the decays need no recapture. BatchNorm running statistics and
`num_batches_tracked` are updated in place inside the graph.

On the CPU the "capturable" step is the same function run directly (no capture): what
tests/test_steps.py compares with the plain step, bit for bit.

Where capture cannot work the step falls back to the plain step and says why
(`cuda_graphs.graph_fallback_reason`), and any batch whose shape differs from the captured one runs
the plain step (never in training: the last partial batch is dropped).

Each step of a fused model, and each captured evaluation forward, owns the ticket counters its
kernels take (preresnet.kernels.workspace), allocated before anything is captured; a graph keeps
its owner's, so several packed runs replay their graphs on their own streams at once without
sharing any.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from .cuda_graphs import WARMUP_STEPS, GraphCapture, graph_fallback_reason, synchronize
from .kernels.workspace import launching_with, new_counters

def make_optimizer(model: torch.nn.Module, recipe, device: torch.device) -> torch.optim.SGD:
    """The recipe's SGD, fused (one kernel for the whole update, on CUDA and CPU): it takes a
    Tensor lr without a host synchronisation, so the same optimizer serves the plain and the
    captured step, and the two compute bit-identical updates."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay, fused=fused)


class PlainStep:
    """forward, loss, backward and optimizer step, run eagerly (the model may be compiled)."""

    def __init__(self, model, forward, optimizer, scaler, runtime, note: str | None = None):
        self.model, self.forward, self.optimizer, self.scaler, self.runtime = model, forward, optimizer, scaler, runtime
        self.note = note  # why the step is not captured, when it was asked to be
        # the ticket counters of the fused kernels this step launches, eagerly or in its graph
        self.counters = new_counters(runtime.device) if runtime.fused else None
        self.calls = 0
        self.first_step_seconds = None  # time to the first step's end: compilation included
        self.capture = None  # GraphCapture, where the step is captured
        self._lr = None

    def set_lr(self, lr: float) -> None:
        if lr != self._lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._lr = lr

    def autocast(self):
        return self.runtime.autocast()

    def body(self, x, y):
        with launching_with(self.counters):
            with self.autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss, logits

    def __call__(self, x, y):
        if self.calls == 0:
            synchronize(self.runtime.device)
            start = time.perf_counter()
            out = self.body(x, y)
            synchronize(self.runtime.device)
            self.first_step_seconds = time.perf_counter() - start
        else:
            out = self.body(x, y)
        self.calls += 1
        return out

    def describe(self) -> str:
        return self.note or "plain step (not captured)"

    def take_timings(self) -> dict:
        """compile_seconds (the first step: compilation, autotuning and warm-up included) and
        capture_seconds (recording the graph), each reported once, by the epoch in which it happened."""
        timings = {} if self.first_step_seconds is None else {"compile_seconds": self.first_step_seconds}
        self.first_step_seconds = None
        if self.capture is not None:
            timings.update(self.capture.take_seconds("capture_seconds", "capture_seconds"))
        return timings


class GraphStep(PlainStep):
    """The whole step on static buffers with a device-tensor lr; captured into a CUDA graph on a GPU."""

    def __init__(self, model, forward, optimizer, scaler, runtime):
        super().__init__(model, forward, optimizer, scaler, runtime)
        device = runtime.device
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=device)
        self.capture = GraphCapture(device, WARMUP_STEPS) if device.type == "cuda" else None
        self.static_x = self.static_y = None

    def set_lr(self, lr: float) -> None:
        if lr != self._lr:
            self.lr.fill_(lr)  # a device write, queued in stream order before the next replay
            self._lr = lr
        for group in self.optimizer.param_groups:  # load_state_dict may have replaced the groups
            if group["lr"] is not self.lr:
                group["lr"] = self.lr

    def autocast(self):
        if self.runtime.amp == "off":
            return contextlib.nullcontext()
        # the autocast weight-cast cache must not outlive a capture (PyTorch's CUDA-graph notes)
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.amp_dtype, cache_enabled=False)

    def static_step(self):
        """What is captured: the step on the static buffers."""
        return self.body(self.static_x, self.static_y)

    def __call__(self, x, y):
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        if x.shape != self.static_x.shape or x.stride() != self.static_x.stride() or y.shape != self.static_y.shape:
            return PlainStep.__call__(self, x, y)  # never in training (partial batches are dropped)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.capture is None:  # nothing to capture on a CPU: the step that would be captured, run directly
            return PlainStep.__call__(self, self.static_x, self.static_y)
        # the captured backward allocates the gradients it writes
        out = self.capture(self.static_step, before_capture=lambda: self.optimizer.zero_grad(set_to_none=True))
        if self.calls == 0:
            self.first_step_seconds = self.capture.first_call_seconds
        self.calls += 1
        return out

    def describe(self) -> str:
        if self.runtime.device.type != "cuda":
            return "capturable step on static buffers, run without capture (CUDA graphs need a CUDA GPU)"
        return f"whole step captured in a CUDA graph after {WARMUP_STEPS} eager warm-up steps"


class EvalForward:
    """An evaluation forward that train()/eval() switch like the model it wraps."""

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self


class TimedEval(EvalForward):
    """The evaluation forward of an uncaptured compiled model, timing its first batch in this
    process: torch.compile compiles evaluation (eval mode, no grad) as a graph of its own, and
    --time-limit must count that one-off as it counts the first step's (eval_compile_seconds)."""

    def __init__(self, forward, model, runtime):
        self.forward, self.model, self.runtime = forward, model, runtime
        self.timed, self.first_batch_seconds = False, None

    def __call__(self, x):
        if self.timed:
            return self.forward(x)
        start = time.perf_counter()
        out = self.forward(x)
        synchronize(self.runtime.device)
        self.first_batch_seconds, self.timed = time.perf_counter() - start, True
        return out

    def take_timings(self) -> dict:
        if self.first_batch_seconds is None:
            return {}
        timings, self.first_batch_seconds = {"eval_compile_seconds": self.first_batch_seconds}, None
        return timings


class GraphedEval(EvalForward):
    """The evaluation forward for the fixed evaluation batch, captured in a CUDA graph on a GPU
    (GraphCapture, after one eager warm-up call); any other batch shape (the last partial batch)
    runs the forward directly. The graph reads the weights and running statistics in place, so it
    stays valid while training updates them. Under torch.compile the forward it captures is the
    compiled one."""

    def __init__(self, forward, model, runtime):
        self.forward, self.model, self.runtime = forward, model, runtime
        self.capture = GraphCapture(runtime.device, 1) if runtime.device.type == "cuda" else None
        self.static_x = None
        self.counters = new_counters(runtime.device) if runtime.fused else None  # its graph's (see PlainStep)

    def _forward(self):
        with launching_with(self.counters):
            if self.runtime.amp == "off":
                return self.forward(self.static_x)
            with torch.autocast(self.runtime.device.type, dtype=self.runtime.amp_dtype, cache_enabled=False):
                return self.forward(self.static_x)

    def __call__(self, x):
        if self.capture is None or torch.is_grad_enabled():
            return self.forward(x)
        if self.static_x is None:
            self.static_x = x.clone()
        if x.shape != self.static_x.shape or x.stride() != self.static_x.stride():
            return self.forward(x)
        self.static_x.copy_(x)
        return self.capture(self._forward)

    def take_timings(self) -> dict:
        """eval_compile_seconds (the warm-up call) and eval_capture_seconds, each reported once."""
        if self.capture is None:
            return {}
        return {**self.capture.take_seconds("first_call_seconds", "eval_compile_seconds"),
                **self.capture.take_seconds("capture_seconds", "eval_capture_seconds")}


def random_state(device: torch.device) -> dict:
    """The generator dropout draws from on device (the only torch randomness of a training step)."""
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    return {"device": device.type, "state": state}


def restore_random_state(saved: dict, device: torch.device) -> None:
    """Set the generator random_state() read (one saved on another kind of device draws anew)."""
    if saved["device"] != device.type:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["state"], device)
    else:
        torch.set_rng_state(saved["state"])


def build_step(model, optimizer, scaler, runtime, own_random_state: bool = False):
    """The step function and the evaluation forward for these settings (own_random_state: a packed
    run whose steps draw random numbers from a generator state of its own).

    Returns (step, eval_forward): step(x, y) -> (loss, logits) with step.set_lr(lr),
    step.take_timings() and step.describe(); eval_forward(x) -> logits, with .eval() and, when
    graphed, take_timings()."""
    forward = torch.compile(model) if runtime.compile else model
    if not runtime.cuda_graphs:
        return PlainStep(model, forward, optimizer, scaler, runtime), (
            TimedEval(forward, model, runtime) if runtime.compile else forward)
    reason = graph_fallback_reason(runtime, own_random_state)
    if reason:
        return PlainStep(model, forward, optimizer, scaler, runtime,
                         note=f"CUDA graphs: the step is not captured ({reason})"), forward
    step = GraphStep(model, forward, optimizer, scaler, runtime)
    return step, GraphedEval(forward, model, runtime)
