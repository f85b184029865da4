"""What the per-GPU tables beside these modules share: which file is read, reading its JSON, and
the device names the tables are keyed by.

Two tables, each validated by its own module: conv_paths.json (`preresnet.kernels.paths`: which
layers leave the Triton kernel) and launch_configs.json (`preresnet.kernels.launch_configs`: each
kernel's launch configuration), both {gpu name: {dtype name: {layer signature key: ...}}}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def table_path(path: str | os.PathLike | None, env: str, default: Path) -> Path:
    """The table file to read: path, else the file named by $env, else default."""
    return Path(path or os.environ.get(env) or default)


def read_json(path: Path, error: type[Exception] | None = None):
    """The parsed JSON of the file path; None when the file does not exist. With error, a file that
    cannot be read or parsed raises error("PATH: not a readable JSON file: ...") instead of the
    OSError / json.JSONDecodeError."""
    if not path.is_file():
        return None
    if error is None:
        return json.loads(path.read_text())
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a readable JSON file: {exc}") from None


def device_name(device) -> str:
    """The tables' name of a device (a torch.device, "cuda:0", or a GPU name, returned as it is):
    the GPU's name, or the device type, "cpu" for the interpreter (tests)."""
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        return device
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
