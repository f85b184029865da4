"""Capturing work into a CUDA graph and replaying it: at batch 128 a PreResNet-110 step launches some
900 to 2,000 kernels of a few microseconds each, so on a GPU the CPU's launch overhead, not
arithmetic, bounds the step. `GraphCapture` runs a function eagerly on a side stream for its first
calls (torch.compile compiles there, the Triton kernels and cuDNN pick their configurations there,
the optimizer creates its momentum buffers: real training steps, so the run's trajectory does not
change), then captures the next call (capture records, it does not execute) and replays it from
then on. preresnet.steps captures the whole training step with it -- forward, loss, backward and
the SGD update -- and the evaluation forward.

Capture cannot hold (`graph_fallback_reason`): fp16 loss scaling (GradScaler decides on the host
whether to skip a step), multi-process runs (DDP's gradient all-reduce is launched from autograd
hooks on its own schedule), and packed runs with dropout (each draws from its own generator state,
which the host swaps in around its steps).
"""

from __future__ import annotations

import time

import torch

WARMUP_STEPS = 3  # eager steps on a side stream before capture (PyTorch's whole-network example uses 3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GraphCapture:
    """A function run eagerly on a side stream for its first `warmup` calls (compilation, autotuning,
    buffers it allocates), then captured into a CUDA graph on that stream and replayed from then on:
    the one capture mechanism of the training step and of the evaluation forward."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.stream = torch.cuda.Stream(device)
        self.graph = self.outputs = None
        self.calls = 0
        self.first_call_seconds = None  # the first eager call, compilation included, until reported
        self.capture_seconds = None  # recording the graph, until reported (take_seconds)

    def __call__(self, function, before_capture=None):
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        synchronize(self.device)
        start = time.perf_counter()
        if self.calls < self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = function()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            synchronize(self.device)
            if self.calls == 0:
                self.first_call_seconds = time.perf_counter() - start
            self.calls += 1
            return out
        if before_capture is not None:
            before_capture()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            outputs = function()
        synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        self.graph, self.outputs = graph, outputs
        graph.replay()  # the capture recorded the call; this runs it
        return outputs

    def take_seconds(self, attribute: str, key: str) -> dict:
        """{key: the first call's or the capture's seconds (attribute)}, once, after it happened."""
        seconds = getattr(self, attribute)
        if seconds is None:
            return {}
        setattr(self, attribute, None)
        return {key: seconds}


def graph_fallback_reason(runtime, own_random_state: bool = False) -> str | None:
    """Why the whole step cannot be captured with these settings, or None."""
    if own_random_state:
        return ("packed runs with dropout: each draws from its own generator state, swapped in by the host around "
                "its steps, which a captured step would not see")
    if runtime.amp == "fp16":
        return ("fp16 loss scaling: GradScaler decides on the host whether to skip each step (a synchronisation "
                "a graph cannot hold); use --amp bf16 for graphs")
    if runtime.dist.enabled:
        return "multi-process training: DDP launches its gradient all-reduce from autograd hooks, outside a graph"
    return None
