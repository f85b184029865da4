"""What trained a run: one record per command (commands.jsonl in the run's folder).

A run is often trained by several commands (--time-limit, a preempted job, a resumed crash), on
different commits, machines, thread counts or precisions. Each command that trains part of a run
appends its own record and rewrites it after every epoch it saves, so the file stays true even for
a command killed mid-run: its record then ends at its last checkpoint. metrics.jsonl's lines name
the command that trained each epoch (their "command" field, an index into commands.jsonl).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels.dispatch import device_name
from .runfiles import COMMANDS_NAME
from .runtime import Runtime, cpu_name

ROOT = Path(__file__).resolve().parents[1]  # the checkout, where the package is run from one
# what the benchmark and reproduction tools write into the checkout: no change to the code that ran
OUTPUT_PATHS = ("bench/results", "preresnet/weights")


@dataclass(frozen=True)
class Command:
    """The command that trains: when it started, on a monotonic clock (--time-limit and its wall time
    count from it) and as a date (every run it trains, packed seeds too, records the same one, so a
    results table tells the runs of one command from commands of their own), and its command line.
    train.py makes it first thing and passes it down."""

    clock: float
    date: str
    argv: tuple[str, ...]

    @classmethod
    def starting(cls, clock: float | None = None, argv: list[str] | None = None) -> "Command":
        """A command starting at clock (time.monotonic(); default now) with argv (default sys.argv)."""
        return cls(time.monotonic() if clock is None else clock, time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   tuple(sys.argv if argv is None else argv))


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's short hash, '+dirty' where a tracked file other than the tools' outputs has changed;
    None outside a git checkout (an installed package)."""
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){path}" for path in OUTPUT_PATHS)],
                               capture_output=True, text=True, cwd=root, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) or None


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def device_description(device: torch.device) -> str:
    """The GPU's name, as the kernels' per-GPU tables name it, or the CPU's model name."""
    return f"CPU ({cpu_name()})" if device.type == "cpu" else device_name(device)


def command_record(runtime: Runtime, command: Command) -> dict:
    """This command as a run's commands.jsonl records it (epochs and times are added as it trains)."""
    return {
        "started": command.date,
        "argv": list(command.argv),
        "commit": git_commit(),
        "host": platform.node(),
        "device": device_description(runtime.device),
        "threads": torch.get_num_threads(),
        "processes": runtime.dist.world_size,
        "torch": torch.__version__,
        "triton": triton_version(),
        "amp": runtime.amp,
        "channels_last": runtime.channels_last,
        "compile": bool(runtime.compile),
        "fused": runtime.fused,
        "cuda_graphs": runtime.cuda_graphs,
    }


def read_commands(out: Path) -> list[dict]:
    path = out / COMMANDS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def commands_text(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def this_command(record: dict, history: list[dict], first_epoch: int, command: Command,
                 stopped_in: dict | None = None) -> dict:
    """record, with what this command has trained so far: the epochs after first_epoch in history
    (those it finished), their step and epoch times, the command's wall time until now, and where
    inside an epoch it stopped (stopped_in: epoch and step), if it did."""
    mine = [m for m in history if m["epoch"] > first_epoch]
    return {**record, **({"stopped_in": stopped_in} if stopped_in else {}),
            "epochs": [mine[0]["epoch"], mine[-1]["epoch"]] if mine else [],
            "train_seconds": round(sum(m.get("train_seconds", 0.0) for m in mine), 1),
            "epoch_seconds": round(sum(m.get("epoch_seconds", 0.0) for m in mine), 1),
            "wall_seconds": round(time.monotonic() - command.clock, 1),
            "pid": os.getpid()}
