"""first-contact's speed matrix and packing rows: train.py's own training step timed in each speed
variant (bench.workloads.VARIANT_FLAGS says what each name runs), one child process per network
(`python -m tools.gpu_plan _matrix` and `_packing`), the rows appended to a JSON-lines file as they
are measured; and the choices made from them: the fastest correct variant, the packed-run count.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from bench.floors import fraction_of_floor
from bench.gpu_report import add_speedups
from bench.workloads import flags_of, packed_training_steps
from preresnet import build_model, get_model
from preresnet.kernels.paths import assign_paths
from preresnet.recipes import resolve_recipe
from preresnet.runtime import Runtime
from preresnet.steps import GRAPH_MODE_ENV, build_step, make_optimizer
from tools.gpu_plan.common import NETWORKS, ORDER, Clock, stand_in, sync

# The speed matrix: training steps of train.py's own step function (preresnet.steps.build_step), in
# these variants of bench.workloads.VARIANT_FLAGS, the cheap, telling rows first
MATRIX_VARIANTS = ("eager-fp32", "eager-amp-cl", "fused", "fused-graphs", "compile", "compile-graphs",
                   "fused-compile-graphs", "compile-reduce-overhead")
# every network's eager rows before any compiled row of the next
MATRIX_MODELS = ("preresnet110", "preresnet164", "wrn16_4")
ROW_SECONDS = {"eager-fp32": 15, "eager-amp-cl": 15, "fused": 25, "fused-graphs": 25}  # others compile: 75
LOSS_TOLERANCE = 0.05  # relative: a variant's first losses against eager-amp-cl's (bf16 rounding, not a broken step)
MATRIX_STEPS = 40
# packed runs measured by first-contact's packing part, per network (the reproduction's seeds train
# packed, as many at a time as it found fastest)
PACKING_COUNTS = {"preresnet110": (1, 2, 4, 8), "preresnet164": (1, 2, 4), "wrn16_4": (1, 2, 4), "tiny": (1, 2)}
WARM_STEPS = 6  # loss-checked steps before timing: compilation, graph warm-up (3 steps) and capture


def read_rows(path: Path, status: str | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("status") == status]


def keep_measured_rows(path: Path, previous: dict | None) -> list[dict]:
    """The rows an earlier command on this machine measured (previous: its report) stay in the rows
    file, the others go (they are measured again); returns the kept ones."""
    kept = [row for row in read_rows(path) if "images_per_second" in row] if previous else []
    path.unlink(missing_ok=True)
    for row in kept:
        append_row(path, row)
    return kept


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def matrix_rows(path: Path) -> list[dict]:
    """The measured rows, with speed-ups, floors and the loss check against eager-amp-cl."""
    rows = read_rows(path)
    for name in {row["model"] for row in rows}:
        mine = [row for row in rows if row["model"] == name]
        reference = next((row["losses"] for row in mine if row["variant"] == "eager-amp-cl" and "losses" in row), None)
        for row in mine:
            if "images_per_second" in row and name in ORDER:
                row["fraction_of_floor"] = fraction_of_floor(row["images_per_second"], name)
            elif "images_per_second" in row:
                row["fraction_of_floor"] = 0.0
            if reference and "losses" in row:
                worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], reference))
                row["loss_rel_diff"] = worst
                row["correct"] = worst <= (LOSS_TOLERANCE if row["variant"] != "eager-fp32" else 2 * LOSS_TOLERANCE)
        add_speedups(rows, name)
    return rows


def choose_variant(rows: list[dict], name: str) -> dict | None:
    """The fastest variant whose losses tracked the reference, with the train.py flags that run it."""
    good = [row for row in rows if row["model"] == name and row.get("correct") and "images_per_second" in row]
    if not good:
        return None
    best = max(good, key=lambda row: row["images_per_second"])
    return {"variant": best["variant"], "images_per_second": best["images_per_second"],
            "flags": train_flags(best["variant"]), "env": variant_env(best["variant"])}


def train_flags(variant: str) -> list[str]:
    """train.py's execution flags that run the variant."""
    v = flags_of(variant)
    return [f"--amp={v['amp']}", "--channels-last" if v["channels_last"] else "--no-channels-last",
            "--compile" if v["compile"] else "--no-compile", "--fused" if v["fused"] else "--no-fused",
            "--cuda-graphs" if v["cuda_graphs"] else "--no-cuda-graphs"]


def variant_env(variant: str) -> dict:
    mode = flags_of(variant).get("graph_mode")
    return {GRAPH_MODE_ENV: mode} if mode else {}


def variant_settings(variant: str, dry: bool) -> tuple[dict, list[str]]:
    """A speed-matrix variant's execution settings; in a dry run the CPU stand-ins for what needs a
    GPU, with notes saying so."""
    v, notes = flags_of(variant), []
    if dry:
        if v["compile"]:
            notes.append("compile replaced by eager (compiling takes minutes on a CPU)")
            v["compile"] = False
        if v["fused"]:
            notes.append("fused replaced by unfused (the interpreted kernels' timings mean nothing)")
            v["fused"] = False
        if v["cuda_graphs"]:
            notes.append("the capturable step runs without capture (no CUDA)")
        if v["amp"] == "bf16":
            v["amp"] = "off"  # CPU bf16 convs are slow and not what is measured
        stand_in(f"{variant}: " + "; ".join(notes or ["CPU timing of a tiny network"]))
    return v, notes


def packing_child(args) -> int:
    """One network's packing rows (a child process of first-contact): K packed copies of train.py's
    step in the variant's settings (bench.workloads.packed_training_steps), aggregate images/s and
    peak memory, for each K while time is left; a K that fails (out of memory) ends the larger ones."""
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    batch, size, steps = (8, 16, 3) if dry else (128, 32, MATRIX_STEPS // 2)
    clock = Clock(args.seconds)
    v, notes = variant_settings(args.variant, dry)
    os.environ[GRAPH_MODE_ENV] = v.pop("graph_mode", "step")
    runtime = Runtime(device=device, loader="torch", **v)
    for runs in map(int, args.counts.split(",")):
        row = {"model": args.model, "variant": args.variant, "runs": runs, "batch": batch}
        if clock.left() < (1 if dry else 10 + 5 * runs):
            append_row(Path(args.rows), {**row, "skipped": "time budget"})
            continue
        step_all = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_all = packed_training_steps("tiny" if dry else args.model, runtime, runs, batch, size)
            for _ in range(WARM_STEPS):  # eager warm-up steps and the captures
                step_all()
            start = time.perf_counter()
            for _ in range(steps):
                step_all()  # waits for every copy's step
            seconds = time.perf_counter() - start
            row.update(images_per_second=steps * runs * batch / seconds, ms=1000 * seconds / steps)
            if device.type == "cuda":
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            if notes:
                row["stand_in"] = "; ".join(notes)
        except Exception as exc:  # out of memory, say: larger packs would fail too
            row["error"] = repr(exc)[:300]
        append_row(Path(args.rows), row)
        print(f"packing {args.model} {args.variant} x{runs}: {row.get('images_per_second', row.get('error'))}",
              flush=True)
        step_all = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" in row:
            break
    return 0


def choose_packing(rows: list[dict]) -> int | None:
    """The fewest packed runs within 5% of the best aggregate images/s (more runs cost memory and
    make each run slower, for no more throughput)."""
    measured = [row for row in rows if "images_per_second" in row]
    if not measured:
        return None
    best = max(row["images_per_second"] for row in measured)
    return min(row["runs"] for row in measured if row["images_per_second"] >= 0.95 * best)


def matrix_child(args) -> int:
    """One network's rows (a child process of first-contact): train.py's step, timed."""
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    batch = 8 if dry else 128
    size = 16 if dry else 32
    steps = 3 if dry else MATRIX_STEPS
    clock = Clock(args.seconds)
    rows_file = Path(args.rows)
    for variant in args.variants.split(","):
        row = {"model": args.model, "variant": variant, "provider": variant, "batch": batch}
        need = ROW_SECONDS.get(variant, 75) if not dry else 1
        if clock.left() < need:
            append_row(rows_file, {**row, "skipped": "time budget"})
            continue
        v, notes = variant_settings(variant, dry)
        append_row(rows_file, {**row, "status": "started"})
        os.environ[GRAPH_MODE_ENV] = v.pop("graph_mode", "step")
        step = model = optimizer = None
        if v["compile"]:
            torch._dynamo.reset()  # each variant compiles afresh, clear of the others' guards and limits
        try:
            torch.manual_seed(0)
            model = (build_model("normal", 1, num_classes=10, fused=v["fused"]) if dry
                     else get_model(args.model, fused=v["fused"]))
            if v["fused"]:
                assign_paths(model, device, torch.bfloat16)
            memory_format = torch.channels_last if v["channels_last"] else torch.contiguous_format
            model.to(device, memory_format=memory_format)
            runtime = Runtime(device=device, amp=v["amp"], channels_last=v["channels_last"], compile=v["compile"],
                              loader="torch", fused=v["fused"], cuda_graphs=v["cuda_graphs"])
            recipe = resolve_recipe(NETWORKS.get(args.model, ("", 0, 0, "paper"))[3])
            optimizer = make_optimizer(model, recipe, device)
            step, _ = build_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), runtime)
            generator = torch.Generator(device=device).manual_seed(0)
            data = [(torch.randn(batch, 3, size, size, device=device, generator=generator)
                     .contiguous(memory_format=memory_format),
                     torch.randint(0, 10, (batch,), device=device, generator=generator)) for _ in range(4)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model.train()
            losses = []
            for i in range(WARM_STEPS):
                step.set_lr(0.1 if i < WARM_STEPS // 2 else 0.02)  # an lr change on the way, as in training
                losses.append(step(*data[i % len(data)])[0].item())
            timings = step.take_timings()
            sync(device)
            start = time.perf_counter()
            for i in range(steps):
                step(*data[i % len(data)])
            sync(device)
            seconds = time.perf_counter() - start
            row.update(images_per_second=steps * batch / seconds, ms=1000 * seconds / steps, losses=losses,
                       compile_seconds=timings.get("compile_seconds"), capture_seconds=timings.get("capture_seconds"),
                       step=step.describe(), captured=bool(getattr(step, "captured", False)))
            if device.type == "cuda":
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            if notes:
                row["stand_in"] = "; ".join(notes)
        except Exception as exc:  # reported with the rest; the next variant runs
            row["error"] = repr(exc)[:400]
        append_row(rows_file, row)
        print(f"matrix {args.model} {variant}: {row.get('images_per_second', row.get('error'))}", flush=True)
        step = model = optimizer = None  # free this variant's memory (and graphs) before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0
