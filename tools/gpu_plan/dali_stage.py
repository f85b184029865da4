"""The GPU plan's stage `dali`: NVIDIA DALI's GPU pipeline against the torch loader, on the GPU.

    PYTHONPATH=/tmp/preresnet-dali/site python3 -m tools.gpu_plan dali   # after the transfer
    python -m tools.gpu_plan dali --dry-run --results DIR --work DIR                       # on the CPU

The GPU machines have no DALI and no network: dali_transfer.py brings the wheel in parts, and the
last of its device commands installs it and runs this stage (tools/gpu_plan/README.md, "DALI on the
GPU").
Each part starts only while it fits the budget (`--budget-seconds`), and the report is written after
each part, under RESULTS/DATE-GPU-dali/ (report.json, report.md, pytest-gpu.log):

1. tests: `pytest -m gpu tests/test_loaders.py`: DALI's GPU pipeline (device_id 0) gives the torch
   loader's batches on the GPU bit for bit, for the same seed and epoch, also sharded for 2 ranks;
2. loaders: one training epoch of 50,000 CIFAR-sized images at batch 128 (channels-last), each
   backend on the GPU, after a warm-up epoch: images/s;
3. step: PreResNet-110's training step as train.py runs it by default when no faster variant is
   chosen (bf16, channels-last, CUDA graphs, unfused, not compiled), warmed up and captured while
   DALI feeds it (as train.py --loader dali does), then for one epoch's steps fed by a fixed batch,
   by the torch loader and by DALI: the loader's share of a step is what the fed step loses against
   the fixed batch.

The choice `--loader auto` makes on this GPU follows: DALI when its batches passed the tests and the
step it fed is not slower than the torch loader's (within TOLERANCE), else the torch loader.
`python -m bench.render_results` turns the newest report per GPU into preresnet/loader_choice.json
and the README's loader line.

`--dry-run`: the same parts on the CPU with DALI's CPU pipeline (device_id None; a part without DALI
installed says so), 256 images at batch 32 and PreResNet-8 in fp32; the GPU tests run only to show
they collect and skip (STAND-IN).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.workloads import environment, flags_of
from preresnet import build_model, get_model, loaders
from preresnet.recipes import resolve_recipe
from preresnet.runfiles import write_json, write_text
from preresnet.runtime import Runtime
from preresnet.steps import build_step, make_optimizer
from preresnet.training import PROGRESS_EVERY
from tools.gpu_plan import returning
from tools.gpu_plan.common import (
    COMMAND,
    Clock,
    cache_env,
    gpu_slug,
    run_logged,
    say,
    stand_in,
    sync,
)

EPOCH_IMAGES, BATCH = 50_000, 128
DRY_IMAGES, DRY_BATCH = 256, 32
LOADER_EPOCHS = 3  # timed, after one warm-up epoch
STEP_ROUNDS = 2  # each feed is timed this often, in turn; the fastest counts
WARM_STEPS = 8  # before timing: cuDNN's algorithm choice, the eager steps and the capture of the graphed step
TOLERANCE = 0.02  # DALI is "not slower" when its fed step reaches 98% of the torch loader's images/s
TEST_SECONDS = 150.0
MODEL = "preresnet110"
# train.py's default step when no faster variant is chosen (bench.workloads.VARIANT_FLAGS), in a dry run fp32 uncaptured
STEP_SETTINGS = flags_of("eager-amp-cl-graphs")
DRY_STEP_SETTINGS = flags_of("eager-fp32-cl")


def pytest_counts(log: str) -> dict:
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's last summary line."""
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", line)]
    if not summary:
        return {}
    return {word.rstrip("s") if word.startswith("error") else word: int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary[-1])}


def choose(report: dict) -> dict | None:
    """The backend --loader auto takes on this GPU, with its reason; None until both fed steps are measured."""
    rows = {row["feed"]: row for row in report["step"]["rows"] if "images_per_second" in row}
    if "torch" not in rows or "dali" not in rows:
        return None
    torch_ips, dali_ips = rows["torch"]["images_per_second"], rows["dali"]["images_per_second"]
    numbers = (f"a {report['step']['model']} step fed by DALI {dali_ips:,.0f} images/s, "
               f"by the torch loader {torch_ips:,.0f}")
    choice = {"torch_images_per_second": torch_ips, "dali_images_per_second": dali_ips}
    if not report["tests"].get("passed"):
        return {**choice, "backend": "torch",
                "reason": f"{numbers}; DALI's GPU batches were not shown identical to the torch loader's"}
    if dali_ips >= (1 - TOLERANCE) * torch_ips:
        return {**choice, "backend": "dali", "reason": f"{numbers}: DALI not slower (within {TOLERANCE:.0%})"}
    return {**choice, "backend": "torch", "reason": f"{numbers}: DALI slower"}


def measured(results_dirs) -> bool:
    """Whether a GPU (not a dry run) has measured the loaders: a dali report with a choice."""
    for results in results_dirs:
        for path in Path(results).glob("*/report.json"):
            data = json.loads(path.read_text())
            if data.get("stage") == "dali" and not data.get("dry_run") and data.get("choice"):
                return True
    return False


class FixedBatch:
    """One batch, `steps` times: the step's speed with no loader at all."""

    def __init__(self, x, y, steps: int):
        self.x, self.y, self.steps = x, y, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def fed_steps(step, batches, device) -> dict:
    """Training steps over batches as train.py's loop runs them: the loss and error summed on the
    device, a wait for the device every PROGRESS_EVERY steps (where the loop checks the loss)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    errors = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    sync(device)
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        loss, logits = step(x, y)
        loss_sum += loss.detach().double() * len(y)
        errors += (logits.detach().argmax(1) != y).sum()
        seen += len(y)
        if (i + 1) % PROGRESS_EVERY == 0:
            float(loss_sum)
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": seen, "mean_loss": float(loss_sum) / seen}


def dali_stage(args) -> int:
    dry = args.dry_run
    clock = Clock(args.budget_seconds)
    on_gpu = torch.cuda.is_available() and not dry
    if not dry and not on_gpu:
        print("gpu_plan: error: dali needs a CUDA GPU (or --dry-run on the CPU)", file=sys.stderr)
        return 2
    if not dry and not loaders.dali_available():
        print("gpu_plan: error: NVIDIA DALI is not importable: bring it with tools/gpu_plan/dali_transfer.py and put its "
              "folder on PYTHONPATH (tools/gpu_plan/README.md, 'DALI on the GPU')", file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    info = environment(device.type)
    backends = ["torch"]
    if loaders.dali_available():
        import nvidia.dali  # deferred: optional (the GPU machines have it only once dali_transfer installed it)

        info["dali"], info["dali_path"] = nvidia.dali.__version__, str(Path(nvidia.dali.__file__).parent)
        backends.append("dali")
    count, batch = (DRY_IMAGES, DRY_BATCH) if dry else (EPOCH_IMAGES, BATCH)
    folder = Path(args.results) / f"{time.strftime('%Y-%m-%d')}-{gpu_slug(info.get('gpu')) if on_gpu else 'cpu-dry-run'}-dali"
    settings = DRY_STEP_SETTINGS if dry else STEP_SETTINGS
    report = {"stage": "dali", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": f"{COMMAND} " + " ".join(sys.argv[1:]), "dry_run": dry, "environment": info,
              "parts": [], "tests": {}, "loaders": [], "images": count, "batch": batch,
              "step": {"model": "PreResNet-8" if dry else "PreResNet-110", **settings, "rows": []},
              "choice": None, "finished": False}

    def save() -> None:
        write_json(folder / "report.json", report)
        write_text(folder / "report.md", markdown(report))
        returning.publish()

    def part(name: str, status: str, seconds: float, note: str = "") -> None:
        report["parts"].append({"name": name, "status": status, "seconds": round(seconds, 1), "note": note})
        say(f"part {name}: {status} ({seconds:.0f} s){' - ' + note if note else ''}")
        save()

    save()
    say(f"dali into {folder}: {info.get('gpu') or 'CPU'}, torch {info['torch']}, DALI {info.get('dali', 'not installed')}, "
        f"budget {args.budget_seconds:.0f} s")

    # 1. the gpu-marked loader tests: the GPU pipeline's batches against the torch loader's on the GPU
    env = cache_env(Path(args.work))
    if dry:
        stand_in("the gpu-marked loader tests need a CUDA GPU: they run here only to show they collect and skip")
    result = run_logged([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                         "tests/test_loaders.py"], folder / "pytest-gpu.log", min(TEST_SECONDS, clock.left() * 0.35), env)
    counts = pytest_counts((folder / "pytest-gpu.log").read_text())
    passed = result["returncode"] == 0 and not result["timed_out"] and counts.get("passed", 0) > 0 \
        and not counts.get("skipped") and not dry
    report["tests"] = {**counts, "passed": passed, "returncode": result["returncode"], "timed_out": result["timed_out"]}
    part("tests", "stand-in" if dry else "pass" if passed else "FAIL", result["seconds"],
         ", ".join(f"{n} {word}" for word, n in counts.items()) + " (pytest-gpu.log)")

    # 2. one training epoch per backend, the loader alone
    start = time.monotonic()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count)
    built = {}
    for backend in backends:
        if clock.left() < (20 if on_gpu else 5):
            report["loaders"].append({"backend": backend, "skipped": "time budget"})
            continue
        loader = built[backend] = loaders.build_loader(images, labels, batch_size=batch, train=True, backend=backend,
                                                       device=device, channels_last=True)
        seconds = []
        for epoch in range(LOADER_EPOCHS + 1):
            loader.set_epoch(epoch)
            sync(device)
            begin = time.perf_counter()
            for x, y in loader:
                pass
            sync(device)
            seconds.append(time.perf_counter() - begin)
        median = statistics.median(seconds[1:])
        report["loaders"].append({"backend": backend, "device": str(device), "images": loader.num_samples, "batch": batch,
                                  "warm_up_seconds": round(seconds[0], 3), "epoch_seconds": [round(s, 4) for s in seconds[1:]],
                                  "images_per_second": loader.num_samples / median})
        save()
    if "dali" not in backends:
        report["loaders"].append({"backend": "dali", "skipped": "NVIDIA DALI is not installed"})
    part("loaders", "done" if len(built) == len(backends) else "partial", time.monotonic() - start,
         "; ".join(f"{row['backend']} {row['images_per_second']:,.0f} images/s" if "images_per_second" in row
                   else f"{row['backend']}: {row['skipped']}" for row in report["loaders"]))

    # 3. the training step, fed by a fixed batch, by the torch loader, by DALI
    start = time.monotonic()
    rows = report["step"]["rows"]
    if "torch" in built and clock.left() > (60 if on_gpu else 10):
        try:
            rows += step_rows(report, built, device, dry, clock)
        except Exception as exc:  # reported; the report keeps the parts before
            rows.append({"feed": "all", "error": repr(exc)[:400]})
    else:
        rows.append({"feed": "all", "skipped": "time budget"})
    report["choice"] = choose(report)
    complete = sum("images_per_second" in row for row in rows) == 1 + len(backends)
    part("step", "done" if complete else "partial", time.monotonic() - start,
         f"--loader auto here: {report['choice']['backend']}" if report["choice"] else "no choice: not every feed measured")
    report["finished"] = complete and len(built) == 2 and (passed or dry)
    report["seconds"] = round(clock.elapsed(), 1)
    save()
    say(f"dali {'dry run ' if dry else ''}done in {clock.elapsed():.0f} s: {folder}")
    return 0 if dry or report["finished"] else 1


def step_rows(report: dict, built: dict, device, dry: bool, clock: Clock) -> list[dict]:
    """The step's images/s per feed, each timed STEP_ROUNDS times (in turn), the fastest kept."""
    settings = DRY_STEP_SETTINGS if dry else STEP_SETTINGS
    torch.manual_seed(0)
    model = build_model("normal", 1, num_classes=10) if dry else get_model(MODEL)
    model.to(device, memory_format=torch.channels_last)
    runtime = Runtime(device=device, loader="torch", **settings)
    optimizer = make_optimizer(model, resolve_recipe("paper"), device)
    step, _ = build_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), runtime)
    step.set_lr(0.1)
    model.train()
    torch_loader = built["torch"]
    x, y = next(iter(torch_loader))
    fixed = FixedBatch(x.clone(), y.clone(), len(torch_loader))
    # the warm-up (and the graph's capture) fed by DALI where it is here, as train.py --loader dali captures
    warm_source = built.get("dali", torch_loader)
    warm_source.set_epoch(99)
    warm_steps = 2 if dry else WARM_STEPS
    warm = fed_steps(step, itertools.islice(warm_source, warm_steps), device)
    report["step"]["warm_up"] = {"fed_by": warm_source.backend, "steps": warm_steps, "seconds": round(warm["seconds"], 2)}
    say(f"step warm-up: {warm_steps} steps fed by {warm_source.backend} in {warm['seconds']:.1f} s ({step.describe()})")
    feeds = {"fixed batch": fixed, **built}
    timings = {feed: [] for feed in feeds}
    losses = {}
    estimate = 0.0
    for round_ in range(1 if dry else STEP_ROUNDS):
        for feed, batches in feeds.items():
            if clock.left() < 1.5 * estimate + 10:
                break
            if feed in built:
                batches.set_epoch(100 + round_)
            timed = fed_steps(step, batches, device)
            timings[feed].append(timed["seconds"])
            losses[feed] = timed["mean_loss"]
            estimate = max(estimate, timed["seconds"])
    rows = []
    steps = len(torch_loader)
    for feed, seconds in timings.items():
        if not seconds:
            rows.append({"feed": feed, "skipped": "time budget"})
            continue
        if not math.isfinite(losses[feed]):  # a broken step or broken batches: no speed to compare
            rows.append({"feed": feed, "error": f"the mean training loss became {losses[feed]}"})
            continue
        rows.append({"feed": feed, "steps": steps, "batch": len(fixed.y), "seconds": [round(s, 3) for s in seconds],
                     "images_per_second": steps * len(fixed.y) / min(seconds), "mean_loss": losses[feed]})
    base = next((row["images_per_second"] for row in rows if row["feed"] == "fixed batch" and "images_per_second" in row),
                None)
    for row in rows:
        if base and "images_per_second" in row and row["feed"] in built:
            row["loader_share"] = max(0.0, 1 - row["images_per_second"] / base)
    report["step"]["step"] = step.describe()
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# dali {report['date']}{' (DRY RUN on the CPU: stand-ins, no GPU figure)' if report['dry_run'] else ''}",
             "", f"{env.get('gpu') or 'CPU'}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
             f"NVIDIA DALI {env.get('dali', 'not installed')}, Python {env.get('python')}, commit {env.get('commit')}", "",
             f"Command: `{report['command']}`", "", "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p['note']} |" for p in report["parts"]]
    lines += ["", f"## Loaders: one training epoch of {report['images']:,} images, batch {report['batch']}, channels-last",
              "", "| backend | device | images/s | epoch seconds (after a warm-up epoch) |", "| --- | --- | --- | --- |"]
    for row in report["loaders"]:
        if "images_per_second" in row:
            lines.append(f"| {row['backend']} | {row['device']} | {row['images_per_second']:,.0f} | "
                         f"{', '.join(map(str, row['epoch_seconds']))} |")
        else:
            lines.append(f"| {row['backend']} | - | {row['skipped']} | |")
    step = report["step"]
    precision = "fp32" if step["amp"] == "off" else step["amp"]
    lines += ["", f"## Training step of {step['model']} ({precision}, channels-last, CUDA graphs "
                  f"{'on' if step['cuda_graphs'] else 'off'}), one epoch's steps", "",
              "| fed by | images/s | loader's share of a step | seconds per round |", "| --- | --- | --- | --- |"]
    for row in step["rows"]:
        if "images_per_second" in row:
            share = f"{100 * row['loader_share']:.1f}%" if "loader_share" in row else "-"
            lines.append(f"| {row['feed']} | {row['images_per_second']:,.0f} | {share} | "
                         f"{', '.join(map(str, row['seconds']))} |")
        else:
            lines.append(f"| {row['feed']} | {row.get('skipped') or row.get('error')} | | |")
    if report.get("choice"):
        lines += ["", f"`--loader auto` here: **{report['choice']['backend']}** ({report['choice']['reason']})."]
    return "\n".join(lines) + "\n"
