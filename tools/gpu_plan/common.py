"""What every stage of the GPU plan shares: where things are, the networks, the messages, the
clock a stage keeps its budget with, and the child processes it runs with their output logged.

The stages import this module and never the other way round (plan -> stages -> common).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from tools.gpu_plan import returning

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_RESULTS = ROOT / "bench" / "results"
KERNELS = ROOT / "preresnet" / "kernels"
BUDGET_SECONDS = 540.0  # of the 600 s a device command may run: start-up, copying back and a margin
DEFAULT_WORK = Path("/tmp/preresnet-plan")
COMMAND = "python -m tools.gpu_plan"  # how the plan is run, as reports and registry entries record it
ORDER = ("preresnet110", "preresnet164", "wrn16_4")
# the networks of the reproduction: (type, depth, width, recipe)
NETWORKS = {"preresnet110": ("normal", 18, 1, "paper"), "preresnet164": ("bottleneck", 18, 1, "paper"),
            "wrn16_4": ("wide", 2, 4, "wrn"),
            # not in the plan's order: the one full schedule 2 CPU cores finish (in about 5 hours)
            "preresnet20": ("normal", 3, 1, "paper")}


def say(*parts) -> None:
    print("[gpu_plan]", *parts, flush=True)


def stand_in(what: str) -> None:
    say(f"STAND-IN (dry run): {what}")


def child_command(*args: str) -> list[str]:
    """A command line running the plan itself (one of its child stages) with this python."""
    return [sys.executable, "-m", "tools.gpu_plan", *args]


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def default_results(work: Path) -> Path:
    """bench/results of this checkout; on a device machine (where $OUT is the folder that comes back)
    that of the return tree, which tools.gpu_plan.returning bundles into $OUT after every save."""
    out = os.environ.get("OUT")
    if not out:
        return COMMITTED_RESULTS
    returning.activate(work / "return", Path(out))
    return work / "return" / "bench" / "results"


def kernels_digest() -> str:
    """What 'passed on the current kernels' refers to: a hash of preresnet/kernels/*.py."""
    digest = hashlib.sha256()
    for path in sorted(KERNELS.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_env(work: Path) -> dict:
    """Compile caches under the work folder, so a second command on the same machine finds them."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    env.setdefault("TRITON_CACHE_DIR", str(work / "triton-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gpu_slug(name: str | None) -> str:
    if not name:
        return "cpu"
    for key in ("H200", "H100", "A100", "L40S", "L4", "B200", "GH200"):
        if key in name:
            return key.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:24]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_logged(command: list[str], log: Path, timeout: float, env: dict, cwd: Path = ROOT,
               term_grace: float = 30.0) -> dict:
    """Run command, its output appended to log and echoed; at timeout SIGTERM (train.py stops at a
    step boundary with a checkpoint), SIGKILL after term_grace. Returns returncode and seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        timed_out = False

        def pump():
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            say(f"time limit: SIGTERM to {command[1] if len(command) > 1 else command[0]}")
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=term_grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)
    return {"returncode": process.returncode, "seconds": time.monotonic() - start, "timed_out": timed_out}
