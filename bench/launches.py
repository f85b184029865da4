"""Device launches per training step, counted on the CPU.

    python -m bench.launches [--models preresnet110 ...] [--providers fused ...] [--batch 2] [--json]

At CIFAR sizes a big GPU runs most kernels of a training step in a few microseconds, about the
cost of launching one, so the number of launches bounds the step as much as the arithmetic does.
It can be counted without a GPU: the step runs on CPU tensors under a TorchDispatchMode that sees
every ATen op, and every Triton launch goes through a proxy that counts it (and, here, skips it:
the values do not matter, only which kernels would run). The count of one op:

  - a view or alias (a result sharing an input's storage, from an op that is not in place), a
    metadata change (`as_strided_`), an allocation (`empty` and kin), and ops outside ATen (the
    profiler's markers): 0, no kernel;
  - a `_foreach_*` or `_fused_*` op (SGD's multi-tensor and fused forms): one launch per chunk of
    tensors CUDA's multi_tensor_apply takes in one launch (110, 64, 48, 36, 30 tensors for 1..5
    tensor lists);
  - any other ATen op: 1 (a cuDNN convolution or its backward is several kernels on a GPU: this
    undercounts the unfused model, which makes the comparison harder on the fused one);
  - a Triton launch: 1; the ATen ops inside the fused layers' custom ops are counted as well.

`_local_scalar_dense` (`.item()`, a host synchronisation) is reported apart: a training step must
have none. torch.compile'd providers are not counted: on the CPU, inductor generates C++ kernels,
fused differently from the Triton kernels it generates for a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import sys
from unittest import mock

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from bench.workloads import MODELS, network_name, training_step

COUNTED_PROVIDERS = ("eager-fp32", "eager-amp-cl", "fused")
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "set_", "as_strided_"}
# CUDA's multi_tensor_apply: tensors one launch takes, by the number of tensor lists (depth)
FOREACH_TENSORS_PER_LAUNCH = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
DEFAULT_BATCH = 2  # the count is the same at any batch (tests/test_launches.py); the ATen ops run: small is fast
TABLE_HEADER = ("model", "provider", "launches", "ATen ops", "Triton kernels", "host syncs")


def _storages(value) -> set[int]:
    found = set()
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, torch.Tensor) and item.device.type != "meta":
            found.add(item.untyped_storage().data_ptr())
        elif isinstance(item, (list, tuple)):
            found |= _storages(item)
    return found


def _foreach_launches(args) -> int:
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    depth = min(max(len(lists), 1), max(FOREACH_TENSORS_PER_LAUNCH))
    return math.ceil(len(lists[0]) / FOREACH_TENSORS_PER_LAUNCH[depth]) if lists else 1


class LaunchCounter(TorchDispatchMode):
    """Counts the device kernels the ops it sees would launch (rules in the module docstring)."""

    def __init__(self):
        super().__init__()
        self.aten = collections.Counter()
        self.triton = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "preresnet":  # count what the custom op's implementation runs
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.namespace != "aten":  # the profiler's record_function markers: host-side only
            return out
        name = func._schema.name.removeprefix("aten::")
        mutates = func._schema.is_mutable
        if name in NO_KERNEL or func.is_view or (not mutates and _storages(out) & _storages((args, kwargs))):
            return out
        multi_tensor = name.startswith(("_foreach_", "_fused_"))  # _fused_sgd_ and kin: multi_tensor_apply too
        self.aten[name] += _foreach_launches(args) if multi_tensor else 1
        return out

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    @property
    def host_syncs(self) -> int:
        return self.aten["_local_scalar_dense"]  # .item()


class _CountingKernel:
    """Stands in for a Triton kernel: `kernel[grid](...)` counts the launch and skips it."""

    def __init__(self, name: str, counter: LaunchCounter):
        self.name, self.counter = name, counter

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        self.counter.triton[self.name] += 1


@contextlib.contextmanager
def counting_triton_launches(counter: LaunchCounter):
    """Replace every Triton kernel of kernels.preact_conv by a counting stand-in."""
    from triton.runtime.jit import KernelInterface

    from preresnet.kernels import preact_conv

    stand_ins = {name: _CountingKernel(name.strip("_").removesuffix("_kernel"), counter)
                 for name, value in vars(preact_conv).items() if isinstance(value, KernelInterface)}
    with mock.patch.multiple(preact_conv, **stand_ins):
        yield


def count_step(step) -> LaunchCounter:
    """The launches of one call of step() (after one untimed call, so that lazy state exists)."""
    step()
    counter = LaunchCounter()
    with counting_triton_launches(counter), counter:
        step()
    return counter


def step_launches(name: str, provider: str, batch: int = 128) -> LaunchCounter:
    """Launches of one training step (forward, loss, backward, SGD) of a registry network."""
    with _disable_current_modes():
        step = training_step(name, provider, "cpu", batch)
    return count_step(step)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="registry names (default: the benchmark networks, bench.workloads.MODELS)")
    parser.add_argument("--providers", nargs="+", default=list(COUNTED_PROVIDERS), choices=COUNTED_PROVIDERS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help="the step's batch (default %(default)s: the count does not depend on it)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model and provider, every op's count")
    return parser


def table_lines() -> list[str]:
    """The header of the Markdown table the command prints: TABLE_HEADER, the counts right-aligned."""
    return ["| " + " | ".join(TABLE_HEADER) + " |",
            "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(TABLE_HEADER))) + " |"]


def table_row(name: str, provider: str, counter: LaunchCounter) -> str:
    """One row of the table: the network by its paper name (PreResNet-110), the counts."""
    cells = (network_name(name), provider, counter.total, sum(counter.aten.values()), sum(counter.triton.values()),
             counter.host_syncs)
    return "| " + " | ".join(map(str, cells)) + " |"


def main(argv: list[str] | None = None) -> int:
    # the launchers accept CPU tensors only under the interpreter (read when triton is first imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    if not args.json:
        print("\n".join(table_lines()), flush=True)
    for name in args.models or MODELS:
        for provider in args.providers:
            counter = step_launches(name, provider, args.batch)
            if args.json:
                print(json.dumps({"model": name, "provider": provider, "batch": args.batch, "launches": counter.total,
                                  "host_syncs": counter.host_syncs, "aten": dict(counter.aten),
                                  "triton": dict(counter.triton)}), flush=True)
            else:
                print(table_row(name, provider, counter), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
