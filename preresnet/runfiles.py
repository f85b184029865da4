"""A run folder's files: the checkpoint format, atomic writes, metrics lines.

A run's folder holds config.json, metrics.jsonl (one line per epoch), commands.jsonl (one record
per command that trained it), curves.png and checkpoint.pt, rewritten atomically after every
epoch; checkpoint-prev.pt is the checkpoint before the last, kept in case the last is unreadable.
Every module that writes a file a reader may see while it is written goes through write_files.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError
from .wording import first_line

CHECKPOINT_FORMAT = "preresnet-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint-prev.pt"  # the checkpoint before the last one, kept in case the last is unreadable
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CURVES_NAME = "curves.png"
COMMANDS_NAME = "commands.jsonl"  # preresnet/provenance.py: one record per command that trained the run
DIVERGED_NAME = "diverged.json"  # in the folder of a packed run whose loss stopped being finite
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's, torch.compile's


class WriteFailed(UserError):
    """A file of the run could not be written (a full disk, a read-only folder); none was changed."""


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_files(writes: dict[Path, Callable[[Path], None]]) -> None:
    """Call each write(tmp_path), then rename every temporary file over its path. Readers never see
    a half-written file, and a write that fails (the step that needs space) raises WriteFailed
    before any of the files has changed."""
    tmps = {}
    try:
        for path, write in writes.items():
            tmps[path] = tmp = temporary_path(path)
            try:
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
                raise WriteFailed(f"cannot write {path}: {detail}; the run stopped with its files as they were "
                                  f"before this save (free space or fix the folder, then continue with --resume "
                                  f"{path.parent})") from None
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename over path: readers never see a half-written file."""
    write_files({Path(path): write})


def write_text(path: Path, text: str) -> None:
    """path holds text, written atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, value) -> None:
    """path holds value as indented JSON, written atomically (its folder made where missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=1) + "\n")


def link_or_copy(source: Path, target: Path) -> None:
    """target becomes the file source is now: a hard link (no copy, no space) where the filesystem has them."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a process killed while writing (SIGKILL leaves them); each can be as big as a checkpoint."""
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, METRICS_NAME, CURVES_NAME, CONFIG_NAME, COMMANDS_NAME):
        for tmp in out.glob(f".{name}.*.tmp"):
            if tmp != temporary_path(out / name):  # another process's
                tmp.unlink(missing_ok=True)


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by train.py; any problem is a one-line UserError."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    previous = path.with_name(PREVIOUS_NAME)
    hint = (f"; the checkpoint before it is kept: continue from it with --resume {previous}"
            if path.name == CHECKPOINT_NAME and previous.is_file() else "")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the CRC-32s: damaged tensors would load
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"damaged bytes in {damaged.split('/', 1)[-1]} (CRC-32 mismatch)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zipfile and torch.load raise many types for truncated or foreign files
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint?): {first_line(exc)}{hint}") \
            from None
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"{path} is not a checkpoint written by this project's train.py: it holds bare weights (a "
                        f"state_dict, as preresnet/weights/ ships them), nothing to resume; eval.py --weights NAME "
                        f"evaluates a registry entry{hint}")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project's train.py{hint}")
    return checkpoint


def strip_wrappers(key: str) -> str:
    """A state_dict key without the prefixes of the wrappers that held the model when it was saved."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


# --- metrics.jsonl --------------------------------------------------------------------------------


def metrics_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_lines(path: Path, rows: list[dict]) -> None:
    write_text(path, metrics_text(rows))


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (a run folder's, or the file itself); [] where there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
