"""What a command prints as it trains: its first lines, each epoch's line (one for packed runs that
ended it together), the one-off times of its first epoch in this process (compilation, graph
capture), and where its runs stopped when a signal stops it."""

from __future__ import annotations

from pathlib import Path

from . import faults
from .runfiles import CHECKPOINT_NAME
from .wording import counted


def step_timings(step_fn, eval_forward) -> dict:
    """Time to the first step in this process (compile_seconds: compilation, autotuning and warm-up
    included), graph capture (capture_seconds), and the same for evaluation; only in the epoch where
    they happened, so a resumed run reports its own."""
    timings = {}
    for part in (step_fn, eval_forward):
        if hasattr(part, "take_timings"):
            timings.update(part.take_timings())
    return timings


def describe_timings(metrics: dict) -> str:
    parts = [f"{label} {metrics[key]:.1f} s" for key, label in (
        ("compile_seconds", "first step"), ("capture_seconds", "capture"), ("eval_compile_seconds", "first eval batch"),
        ("eval_capture_seconds", "eval capture")) if key in metrics]
    return f"  ({', '.join(parts)})" if parts else ""


def epoch_line(epoch: int, epochs: int, metrics: dict) -> str:
    return (f"epoch {epoch}/{epochs}  lr {metrics['lr']:g}  train loss {metrics['train_loss']:.4f}  "
            f"train error {100 * metrics['train_error']:.2f}%  test loss {metrics['test_loss']:.4f}  "
            f"test error {100 * metrics['test_error']:.2f}%  {metrics['images_per_second']:.0f} img/s  "
            f"{metrics['epoch_seconds']:.1f} s{describe_timings(metrics)}")


def packed_epoch_line(done: list, seconds: float) -> str:
    """One line for the packed runs that ended an epoch together: each run's training loss and test
    error, and the images/s of all of them together."""
    epochs = sorted({run.epoch for run in done})
    parts = [f"{run.name}: train loss {run.metrics['train_loss']:.4f} test error {100 * run.metrics['test_error']:.2f}%"
             for run in done]
    images = sum(run.metrics["images_per_second"] * run.metrics["train_seconds"] for run in done)
    train_seconds = max(run.metrics["train_seconds"] for run in done)
    return (f"epoch {'/'.join(map(str, epochs))}/{done[0].recipe.epochs}  lr {done[0].metrics['lr']:g}  "
            + "  ".join(parts) + f"  {images / train_seconds:.0f} img/s in all  {seconds:.1f} s")


def start_lines(runs: list, dataset, runtime, packed: bool) -> list[str]:
    """What a command says before its first step: the network, the data, how it runs and where it
    writes; the step; the layers the fused network leaves on PyTorch's ops; where each run resumes."""
    first = runs[0]
    lines = [f"{first.model.paper_name}: {sum(p.numel() for p in first.model.parameters()) / 1e6:.2f}M parameters, "
             f"{len(dataset.train.labels)} training / {len(dataset.test.labels)} test images, {runtime.describe()}; "
             f"writing to {first.out if len(runs) == 1 else first.out.parent}"
             + (f" ({len(runs)} runs packed: {', '.join(run.name for run in runs)})" if len(runs) > 1
                else f" (run {runs[0].name})" if packed else ""),
             f"step: {first.step_fn.describe()}"]
    if first.on_torch_ops:
        lines.append(f"fused: {len(first.on_torch_ops)} layers run PyTorch's ops, measured faster there than the "
                     f"Triton kernel (preresnet/kernels/conv_paths.json): {', '.join(first.on_torch_ops)}")
    for run in runs:
        prefix = f"{run.name}: " if packed else ""
        if run.position:
            lines.append(f"{prefix}resuming in epoch {run.epoch + 1} after step {run.position['step']} "
                         f"(iteration {run.iteration})")
        elif run.epoch:
            lines.append(f"{prefix}resuming after epoch {run.epoch} (iteration {run.iteration})")
    return lines


def command_folder(runs: list, packed: bool) -> Path:
    """What --resume continues: the run's folder, or the folder of a packed command's runs."""
    return runs[0].out.parent if packed else runs[0].out


def interrupted(runs: list, packed: bool) -> faults.Interrupted:
    """The stop signal's exception, saying where each run stopped and how to continue."""
    saved = any((run.out / CHECKPOINT_NAME).is_file() for run in runs)
    if packed:
        where = f": {counted(len(runs), 'run')} stopped (" + "; ".join(f"{run.name} {run.describe_position()}" for run in runs) + ")"
    else:
        where = f" {runs[0].describe_position()}"
    if not saved:
        return faults.Interrupted(faults.stop_requested(), f"{where}, nothing trained yet and nothing to resume")
    written = "checkpoints written" if packed else "checkpoint written"
    return faults.Interrupted(faults.stop_requested(), f"{where}, {written}; continue with --resume "
                              f"{command_folder(runs, packed)} (or the same command with --resume auto)")
