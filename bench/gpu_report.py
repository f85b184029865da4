"""One-call GPU report, its sections in order of value, each saved as it ends:

1. the GPU tests (`pytest -m gpu`: the kernels' stress test on concurrent streams first, then the
   kernels and the captured steps against PyTorch);
2. kernel correctness: every unit shape of PreResNet-110, -164 and WRN-16-4, fused against PyTorch
   at the same precision, both against float64;
3. the training-step matrix: train.py's own step for those networks in every execution variant
   (eager fp32, eager bf16 channels-last, compile, fused, fused + compile, CUDA graphs);
4. the per-GPU table of which layers leave the Triton kernel;
5. a short real-data run (with --data-dir).

    python -m bench.gpu_report --out bench/results/DATE-GPU [--data-dir data/cifar10-jpeg] [--time-limit 450]

Writes DIR/report.json and DIR/report.md, downloading nothing. Each section keeps to its share of
--time-limit: what did not fit is named in the report, never left out silently. A failed GPU test,
a kernel whose error exceeds the bound (FAIL) or one left unchecked for lack of time (INCOMPLETE)
makes the exit status 1. `python -m bench.render_results` turns committed reports into the README's
performance table, the per-GPU layer paths and what `auto` turns on for that GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.floors import fraction_of_floor
from bench.render_results import provider_label
from bench.workloads import (MODELS, ROOT, UNIT_PROVIDERS, conv_path_step, environment, is_fused, layer_signatures,
                             make_unit, skip_reason, time_step, torch_path_layers, train_py_step, unit_shapes, unit_step)
from preresnet.kernels.dispatch import TABLE_ENV
from preresnet.runfiles import read_metrics

TIME_LIMIT = 7.5 * 60
# Where each section must end, as a fraction of --time-limit. A section starts new work only while
# its share is not spent, so the later ones keep theirs; the real-data run takes what is left.
TESTS_END = 0.2
CORRECTNESS_END = 0.35
MATRIX_END = 0.6  # 0.7 without --data-dir
PATHS_END = 0.7
GPU_TESTS = ("tests/test_kernel_stress.py", "tests/test_kernels.py", "tests/test_steps.py")
MODEL_ROW_SECONDS = 45  # one model row may compile a whole network
TORCH_PATH_MARGIN = 0.95  # PyTorch's ops replace the Triton kernel only when at least 5% faster: it keeps more memory
ERROR_FACTOR = 3.0  # the kernels may be this many times less accurate than PyTorch at the same precision


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def until(self, end: float) -> float:
        """Seconds left before the share of the budget that ends at `end` (a fraction) is spent."""
        return self.left() - self.budget * (1 - end)


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def unit_errors(shape, dtype: torch.dtype, batch: int = 32) -> dict:
    """Output, input- and conv1-weight-gradient errors of the fused unit and PyTorch's at dtype against float64."""
    torch.manual_seed(0)
    exact_unit = make_unit(shape, fused=False).cuda().double().train()
    units = {"fused": make_unit(shape, fused=True), "torch": make_unit(shape, fused=False)}
    x64 = torch.randn(batch, shape.in_channels, shape.size, shape.size, device="cuda", dtype=torch.float64,
                      requires_grad=True)
    exact = exact_unit(x64)
    grad = torch.randn_like(exact)
    exact.backward(grad)
    results = {}
    for kind, unit in units.items():
        unit.load_state_dict({k: v.float() for k, v in exact_unit.state_dict().items()})
        unit = unit.cuda().to(memory_format=torch.channels_last).train()
        x = x64.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = unit(x)
        out.float().backward(grad.float())
        results[kind] = {"output": relative_error(out, exact), "grad_input": relative_error(x.grad, x64.grad),
                         "grad_conv1_weight": relative_error(unit.conv1.weight.grad, exact_unit.conv1.weight.grad)}
    return results


def check_correctness(clock: Clock) -> tuple[list[dict], bool]:
    rows = []
    # the training dtype first, over every shape: what a short budget checks is what matters most
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in unit_shapes():
            if clock.until(CORRECTNESS_END) <= 0:
                rows.append({"shape": shape.name, "dtype": str(dtype), "skipped": "time budget", "pass": False})
                print(f"INCOMPLETE {shape.name} {dtype}: out of time", flush=True)
                continue
            try:
                errors = unit_errors(shape, dtype)
            except Exception as exc:  # a crash is a failure, reported with the rest
                rows.append({"shape": shape.name, "dtype": str(dtype), "error": repr(exc), "pass": False})
                print(f"FAIL {shape.name} {dtype}: {exc!r}", flush=True)
                continue
            passed = all(errors["fused"][k] <= ERROR_FACTOR * errors["torch"][k] + 1e-6 for k in errors["fused"])
            rows.append({"shape": shape.name, "dtype": str(dtype).removeprefix("torch."), **errors, "pass": passed})
            worst = max(errors["fused"][k] / max(errors["torch"][k], 1e-12) for k in errors["fused"])
            print(f"{'ok  ' if passed else 'FAIL'} {shape.name:42s} {str(dtype):15s} fused/torch error ratio "
                  f"{worst:6.2f}  {errors['fused']}", flush=True)
    return rows, all(row["pass"] for row in rows)  # a failed, crashed or unchecked unit is not passed


def measure(make_step, batch: int, iterations: int = 20) -> dict:
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_step(make_step(), warmup=2 if iterations < 20 else 3, iterations=iterations)
    except Exception as exc:
        return {"error": repr(exc)[:300]}
    return {"ms": ms, "images_per_second": batch * 1000 / ms, "peak_memory_bytes": torch.cuda.max_memory_allocated()}


# the baseline and the fused model first, for every network, before the variants that compile
MATRIX_PROVIDERS = ("eager-fp32", "fused", "eager-amp-cl", "compile", "fused-compile", "compile-graphs",
                    "fused-compile-graphs")


def run_gpu_tests(clock: Clock) -> dict:
    """`pytest -m gpu` over GPU_TESTS, kernels compiled, within this section's share: exit status, output's end."""
    seconds = int(clock.until(TESTS_END))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    outcome = {"command": " ".join(["python", *command[1:]])}
    if seconds < 30:
        return {**outcome, "skipped": "time budget", "returncode": None}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds, cwd=ROOT,
                                env={**os.environ, "TRITON_INTERPRET": "0"})
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {**outcome, "returncode": None, "error": f"stopped after {seconds} s (the time budget)",
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    print(result.stdout[-2000:], flush=True)
    return {**outcome, "returncode": result.returncode, "tail": (result.stdout + result.stderr)[-3000:]}


def benchmark_matrix(clock: Clock, batch: int, end: float, matrix: dict, save) -> None:
    """Fill matrix["models"] (train.py's own step) and matrix["units"], saving after each row: a row is
    measured while the section's share (ending at `end`) leaves it its time, else named as skipped."""
    models, units = matrix.setdefault("models", []), matrix.setdefault("units", [])
    for provider in MATRIX_PROVIDERS:
        for name in MODELS:
            row = {"model": name, "provider": provider, "batch": batch}
            if reason := skip_reason(provider, "cuda"):
                row["skipped"] = reason
            elif clock.until(end) < MODEL_ROW_SECONDS:
                row["skipped"] = "time budget"
            else:
                row.update(measure(lambda: train_py_step(name, provider, "cuda", batch), batch))
            if "images_per_second" in row:
                row["fraction_of_floor"] = fraction_of_floor(row["images_per_second"], name)
                if is_fused(provider):
                    row["layers_on_torch_ops"] = len(torch_path_layers(name, "cuda"))
            models.append(row)
            add_speedups(models, name)
            save()
            print(f"model {name:13s} {provider:21s} {row.get('images_per_second', row.get('skipped', row.get('error')))}",
                  flush=True)
    for shape in unit_shapes():
        for part, backward, provider in itertools.product(("layer", "unit"), (False, True), UNIT_PROVIDERS):
            row = {"shape": shape.name, "part": part, "pass": "fwd+bwd" if backward else "fwd",
                   "provider": provider, "batch": batch}
            if clock.until(end) < 20:
                row["skipped"] = "time budget"
            else:
                row.update(measure(lambda: unit_step(shape, provider, "cuda", batch, backward, part == "layer"), batch))
            units.append(row)
        save()


def choose_conv_paths(clock: Clock, batch: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Time every distinct fused layer of the paper networks on both paths (forward + backward at
    dtype, the training setting) and keep the faster: {signature key: {path, triton_ms, torch_ms}}."""
    entries = {}
    for signature in layer_signatures():
        key = signature.key
        if clock.until(PATHS_END) <= 0:
            entries[key] = {"path": "triton", "skipped": "time budget"}
            continue
        times = {path: measure(lambda: conv_path_step(signature, path, "cuda", batch, dtype), batch, iterations=10)
                 for path in ("triton", "torch")}
        if "error" in times["triton"] or "error" in times["torch"]:
            # a failing path is not kept: PyTorch's ops only when the Triton kernel alone failed
            failed_alone = "error" in times["triton"] and "error" not in times["torch"]
            entries[key] = {"path": "torch" if failed_alone else "triton",
                            "error": times["triton"].get("error") or times["torch"].get("error")}
        else:
            triton_ms, torch_ms = times["triton"]["ms"], times["torch"]["ms"]
            entries[key] = {"path": "torch" if torch_ms < TORCH_PATH_MARGIN * triton_ms else "triton",
                            "triton_ms": triton_ms, "torch_ms": torch_ms, "batch": batch}
        print(f"conv path {key:38s} {entries[key]}", flush=True)
    return {torch.cuda.get_device_name(): {str(dtype).removeprefix("torch."): entries}}


def add_speedups(rows: list[dict], name: str) -> None:
    """Speed-up of each provider over eager-fp32 and over compile, for one model."""
    mine = [r for r in rows if r["model"] == name and "images_per_second" in r]
    base = {r["provider"]: r["images_per_second"] for r in mine}
    for row in mine:
        for reference in ("eager-fp32", "compile"):
            if reference in base:
                row[f"speedup_over_{reference}"] = row["images_per_second"] / base[reference]


def real_data_run(data_dir: str, out: Path, clock: Clock) -> dict:
    seconds = int(clock.left() - 30)
    if seconds < 60:
        return {"skipped": "time budget"}
    run_dir = ROOT / "runs" / f"gpu-report-{out.name}-preresnet110-fused"  # the report keeps its metrics
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun's epochs only
    command = [sys.executable, str(ROOT / "train.py"), "--type", "normal", "--depth", "18", "--dataset", "folder",
               "--data-dir", data_dir, "--epochs", "3", "--fused", "--loader", "torch", "--no-progress",
               "--out", str(run_dir)]
    outcome = {"command": "python " + " ".join(command[1:])}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds, cwd=ROOT, env=os.environ)
        outcome.update(returncode=result.returncode, stderr_tail=result.stderr[-1500:])
    except subprocess.TimeoutExpired:
        outcome["error"] = f"stopped after {seconds} s (the time budget); the epochs below finished"
    outcome["epochs"] = read_metrics(run_dir)
    return outcome


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU report {report['date']}", "",
             f"{env.get('gpu')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
             f"triton {env['triton']}, commit {env['commit']}", "", f"Command: `{report['command']}`", ""]
    if tests := report.get("tests"):
        verdict = {0: "PASS", None: "NOT RUN"}.get(tests.get("returncode"), "FAIL")
        lines += [f"## GPU tests: {verdict}", "", f"`{tests['command']}`"
                  + (f": {tests.get('skipped') or tests.get('error')}" if tests.get("returncode") is None else ""),
                  "", "```text", (tests.get("tail") or "").strip()[-1500:], "```", ""]
    if "correctness" in report:
        lines += [f"## Kernel correctness: {'PASS' if report['correctness_pass'] else 'FAIL'}", "",
                  "Largest relative error against the unfused unit in float64 (fused / PyTorch at the same precision).",
                  "", "| unit | dtype | output | grad input | grad conv1 weight | pass |",
                  "| --- | --- | --- | --- | --- | --- |"]
    for row in report.get("correctness", []):
        if "fused" in row:
            cells = [f"{row['fused'][k]:.1e} / {row['torch'][k]:.1e}" for k in ("output", "grad_input", "grad_conv1_weight")]
            lines.append(f"| {row['shape']} | {row['dtype']} | {' | '.join(cells)} | {'yes' if row['pass'] else 'NO'} |")
        else:
            lines.append(f"| {row['shape']} | {row['dtype']} | {row.get('error') or row.get('skipped')} | | | |")
    for dtypes in report.get("conv_paths", {}).values():
        for dtype, entries in dtypes.items():
            lines += ["", f"## Layer paths ({dtype}, forward + backward, ms)", "",
                      "Each distinct fused layer on the Triton kernel and on PyTorch's ops (cuDNN); PyTorch's are "
                      f"kept only when at least {100 * (1 - TORCH_PATH_MARGIN):.0f}% faster.", "",
                      "| layer | Triton | PyTorch | kept |", "| --- | --- | --- | --- |"]
            for key, entry in entries.items():
                times = (f"{entry['triton_ms']:.3f} | {entry['torch_ms']:.3f}" if "triton_ms" in entry
                         else f"{entry.get('skipped') or entry.get('error')} |")
                lines.append(f"| {key} | {times} | {entry['path']} |")
    if "matrix" in report:
        lines += ["", "## Training step (images/s)", "",
                  "| model | provider | images/s | vs eager-fp32 | vs compile | of floor | peak memory |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in report["matrix"].get("models", []):
            if "images_per_second" in row:
                lines.append(f"| {row['model']} | {provider_label(row)} | {row['images_per_second']:,.0f} | "
                             f"{row.get('speedup_over_eager-fp32', float('nan')):.2f}x | {row.get('speedup_over_compile', float('nan')):.2f}x | "
                             f"{100 * row['fraction_of_floor']:.0f}% | {row['peak_memory_bytes'] / 2**30:.2f} GiB |")
            else:
                lines.append(f"| {row['model']} | {row['provider']} | {row.get('skipped') or row.get('error')} | | | | |")
        lines += ["", "## Units (ms, median)", "", "| unit | part | pass | provider | ms | images/s |", "| --- | --- | --- | --- | --- | --- |"]
        for row in report["matrix"].get("units", []):
            value = f"{row['ms']:.3f} | {row['images_per_second']:,.0f}" if "ms" in row else f"{row.get('skipped') or row.get('error')} |"
            lines.append(f"| {row['shape']} | {row['part']} | {row['pass']} | {row['provider']} | {value} |")
    if run := report.get("real_data"):
        lines += ["", "## Real-data run", ""]
        if run.get("epochs"):
            lines += [f"`{run['command']}`", "", "| epoch | test error | images/s |", "| --- | --- | --- |"]
            lines += [f"| {m['epoch']} | {100 * m['test_error']:.2f}% | {m['images_per_second']:,.0f} |" for m in run["epochs"]]
            if run.get("error"):
                lines += ["", run["error"]]
        else:
            lines.append(f"not completed: {run.get('skipped') or run.get('error') or run.get('stderr_tail')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for report.json and report.md")
    parser.add_argument("--data-dir", help="the extracted JPEG CIFAR-10 copy, for a 3-epoch PreResNet-110 run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, metavar="SECONDS",
                        help=f"time for the whole report (default {TIME_LIMIT:.0f}); each section stops in time for "
                             f"the next")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_report: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_report: error: unset TRITON_INTERPRET: the report times compiled kernels", file=sys.stderr)
        return 2
    clock = Clock(args.time_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "python -m bench.gpu_report " + " ".join(sys.argv[1:]),
              "environment": environment("cuda")}

    def save() -> None:  # after every section: a crash or a kill later still leaves what was measured
        report["seconds"] = time.perf_counter() - clock.start
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "report.md").write_text(markdown(report))

    report["tests"] = run_gpu_tests(clock)
    save()
    report["correctness"], report["correctness_pass"] = check_correctness(clock)
    save()
    report["matrix"] = {}
    benchmark_matrix(clock, args.batch_size, MATRIX_END if args.data_dir else PATHS_END, report["matrix"], save)
    report["conv_paths"] = choose_conv_paths(clock, args.batch_size)
    (out / "conv_paths.json").write_text(json.dumps(report["conv_paths"], indent=1) + "\n")
    os.environ[TABLE_ENV] = str((out / "conv_paths.json").resolve())  # the real-data run uses the fresh table
    save()
    if args.data_dir:
        report["real_data"] = real_data_run(args.data_dir, out, clock)
    save()
    tests_ok = report["tests"].get("returncode") == 0
    print(f"wrote {out / 'report.json'} and {out / 'report.md'} in {report['seconds']:.0f} s; GPU tests "
          f"{'PASS' if tests_ok else 'FAIL'}, kernels {'PASS' if report['correctness_pass'] else 'FAIL'}")
    return 0 if report["correctness_pass"] and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
