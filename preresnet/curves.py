"""A run's training curves (curves.png): loss and error by epoch, train and test.

Drawn on a matplotlib Figure of its own, with no pyplot: no backend is chosen or changed for the
program that imports this, and no window can open.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .runfiles import atomic_write


def save_curves(history: list[dict], path: Path, title: str) -> None:
    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_err = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m["train_loss"] for m in history], label="train loss")
    ax_loss.plot(epochs, [m["test_loss"] for m in history], label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_err.plot(epochs, [100 * m["train_error"] for m in history], label="train error")
    ax_err.plot(epochs, [100 * m["test_error"] for m in history], label="test error")
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
