"""The staged GPU plan: what a GPU session (one H100 or H200, 15 minutes of device time, commands of
at most 10 minutes) is asked, one stage per command, each ending by itself well inside 10 minutes.

    python -m bench.gpu_plan next                 # which stage (and model) the committed results call for
    python -m bench.gpu_plan first-contact        # kernel tests, launch configs, layer paths, speed matrix, packing
    python -m bench.gpu_plan reproduce [--model preresnet110]   # the paper's schedule, seeds packed, resumable
    python -m bench.gpu_plan dali                 # DALI's GPU pipeline against the torch loader (bench/dali_stage.py)
    python -m bench.gpu_plan STAGE --dry-run --results DIR      # on the CPU: tiny network, stand-ins
    python -m bench.gpu_plan unpack FILES_AT      # here, after a command: its returned results into the checkout

The order (`next` applies it): `first-contact` until it has passed on the current kernels
(kernels/*.py hashed into its report), then `reproduce` until PreResNet-110 is finished, then
PreResNet-164, then WRN-16-4. bench/README.md has the exact device commands.

Every stage keeps a wall-clock budget (`--budget-seconds`, default 540 of the command's 600), starts
a part only while it fits, and writes its results after every part, so a stage cut short still
returns what it measured. Results go under `--results` (default `bench/results`), in the layout of
this repository. On the GPU machine, where `$OUT` is the folder that comes back, they go to a return
tree under `--work` instead, which bench/returning.py bundles into a few files at the top of `$OUT`
after every save (a command brings back at most 8 files); `unpack` extracts them over the checkout.
State that only needs to live while the machine is warm (the extracted data, the run folders, the
torch.compile and Triton caches, so that a second command on the same machine compiles nothing
again) is kept under `--work` (default /tmp/preresnet-plan).

`--dry-run` runs a stage on the CPU with a tiny network, a synthetic dataset and one or two epochs;
each GPU-only part is replaced by a stand-in that prints `STAND-IN` and says what it replaces, so a
GPU session never finds a crash that the CPU could have shown (tests/test_gpu_plan.py runs them).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench import returning
from preresnet import sweeps

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = ROOT / "bench" / "results"
MIN_TRAIN_SECONDS = 150  # a reproduce command with less training time left does not start train.py
BUDGET_SECONDS = 540.0  # of the 600 s a device command may run: start-up, copying back and a margin
DEFAULT_WORK = Path("/tmp/preresnet-plan")
DATA_ARCHIVE = ROOT / "data" / "cifar10-jpeg.tar.gz"
DATA_DESCRIPTION = "CIFAR-10 re-encoded as JPEG (lossy; not the papers' data)"
ORDER = ("preresnet110", "preresnet164", "wrn16_4")
# the networks of the reproduction: (type, depth, width, recipe)
NETWORKS = {"preresnet110": ("normal", 18, 1, "paper"), "preresnet164": ("bottleneck", 18, 1, "paper"),
            "wrn16_4": ("wide", 2, 4, "wrn"),
            # not in the plan's order: the one full schedule 2 CPU cores finish (in about 5 hours)
            "preresnet20": ("normal", 3, 1, "paper")}
PAPER_ERROR = {"preresnet110": 0.0637, "preresnet164": 0.0546, "wrn16_4": 0.0502}
USER_DATA_DIR = "data/cifar10-jpeg"  # where README.md has the archive extracted: the folder weights entries name
DEFAULT_SEEDS = (0, 1, 2)
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "curves.png", "commands.jsonl")  # what a run folder holds
# reproduce --device cpu: fp32 as on a GPU's reference path; channels-last is 25% faster on a CPU
CPU_FLAGS = ("--device", "cpu", "--amp=off", "--channels-last", "--no-compile", "--no-fused", "--no-cuda-graphs")

# The speed matrix: training steps of train.py's own step function (preresnet.training.make_step_fn).
VARIANTS = {
    "eager-fp32": dict(amp="off", channels_last=False, compile=False, fused=False, cuda_graphs=False),
    "eager-amp-cl": dict(amp="bf16", channels_last=True, compile=False, fused=False, cuda_graphs=False),
    "fused": dict(amp="bf16", channels_last=True, compile=False, fused=True, cuda_graphs=False),
    "fused-graphs": dict(amp="bf16", channels_last=True, compile=False, fused=True, cuda_graphs=True),
    "compile": dict(amp="bf16", channels_last=True, compile=True, fused=False, cuda_graphs=False),
    "compile-graphs": dict(amp="bf16", channels_last=True, compile=True, fused=False, cuda_graphs=True),
    "fused-compile-graphs": dict(amp="bf16", channels_last=True, compile=True, fused=True, cuda_graphs=True),
    "compile-reduce-overhead": dict(amp="bf16", channels_last=True, compile=True, fused=False, cuda_graphs=True,
                                    graph_mode="reduce-overhead"),
}
# the cheap, telling rows first; every network's eager rows before any compiled row of the next
MATRIX_MODELS = ("preresnet110", "preresnet164", "wrn16_4")
ROW_SECONDS = {"eager-fp32": 15, "eager-amp-cl": 15, "fused": 25, "fused-graphs": 25}  # others compile: 75
LOSS_TOLERANCE = 0.05  # relative: a variant's first losses against eager-amp-cl's (bf16 rounding, not a broken step)
MATRIX_STEPS = 40
# packed runs measured by first-contact's packing part, per network (the reproduction's seeds train
# packed, as many at a time as it found fastest)
PACKING_COUNTS = {"preresnet110": (1, 2, 4, 8), "preresnet164": (1, 2, 4), "wrn16_4": (1, 2, 4), "tiny": (1, 2)}
WARM_STEPS = 6  # loss-checked steps before timing: compilation, graph warm-up (3 steps) and capture


def say(*parts) -> None:
    print("[gpu_plan]", *parts, flush=True)


def stand_in(what: str) -> None:
    say(f"STAND-IN (dry run): {what}")


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def default_results(work: Path) -> Path:
    """bench/results of this checkout; on a device machine (where $OUT is the folder that comes back)
    that of the return tree, which bench.returning bundles into $OUT after every save."""
    out = os.environ.get("OUT")
    if not out:
        return COMMITTED_RESULTS
    returning.activate(work / "return", Path(out))
    return work / "return" / "bench" / "results"


def kernels_digest() -> str:
    """What 'passed on the current kernels' refers to: a hash of kernels/*.py and the tables."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_env(work: Path) -> dict:
    """Compile caches under the work folder, so a second command on the same machine finds them."""
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    env.setdefault("TRITON_CACHE_DIR", str(work / "triton-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


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
        import threading

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


# --- first-contact --------------------------------------------------------------------------------


class Report:
    """report.json in bench.gpu_report's format (so bench.render_results reads its matrix and layer
    paths), plus this stage's parts; rewritten after every part."""

    def __init__(self, folder: Path, command: str, dry_run: bool, mirror: Path | None = None):
        self.folder, self.mirror = folder, mirror
        self.data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command, "stage": "first-contact",
                     "dry_run": dry_run, "kernels_digest": kernels_digest(), "parts": [], "correctness": [],
                     "correctness_pass": False, "matrix": {"models": []}}

    def part(self, name: str, status: str, seconds: float, **detail) -> None:
        self.data["parts"] = [p for p in self.data["parts"] if p["name"] != name]
        self.data["parts"].append({"name": name, "status": status, "seconds": round(seconds, 1), **detail})
        say(f"part {name}: {status} ({seconds:.0f} s){' - ' + detail['note'] if 'note' in detail else ''}")
        self.save()

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "report.json", self.data)
        (self.folder / "report.md").write_text(first_contact_markdown(self.data))
        if self.mirror is not None:  # what a later command on this warm machine continues from
            shutil.copytree(self.folder, self.mirror, dirs_exist_ok=True)
        returning.publish()

    def earlier(self, previous: dict | None, name: str, *statuses: str) -> bool:
        """Whether an earlier command on this machine finished this part (same kernels, same GPU)."""
        return bool(previous) and any(p["name"] == name and p["status"] in statuses for p in previous["parts"])


def gpu_slug(name: str | None) -> str:
    if not name:
        return "cpu"
    for key in ("H200", "H100", "A100", "L40S", "L4", "B200", "GH200"):
        if key in name:
            return key.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:24]


def first_contact(args) -> int:
    import torch

    from bench.workloads import environment

    dry = args.dry_run
    clock = Clock(args.budget_seconds)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = cache_env(work)
    os.environ.update({k: env[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
    on_gpu = torch.cuda.is_available() and not dry
    if not dry and not on_gpu:
        print("gpu_plan: error: first-contact needs a CUDA GPU (or --dry-run on the CPU)", file=sys.stderr)
        return 2
    if not dry and os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_plan: error: unset TRITON_INTERPRET: first-contact measures compiled kernels", file=sys.stderr)
        return 2
    device = "cuda" if on_gpu else "cpu"
    info = environment(device)
    folder = Path(args.results) / f"{time.strftime('%Y-%m-%d')}-{gpu_slug(info.get('gpu')) if on_gpu else 'cpu-dry-run'}"
    state = work / "first-contact"
    previous = None
    if (state / "report.json").is_file():
        candidate = json.loads((state / "report.json").read_text())
        if candidate.get("kernels_digest") == kernels_digest() and candidate.get("dry_run") == dry \
                and candidate.get("environment", {}).get("gpu") == info.get("gpu"):
            previous = candidate
            say(f"continuing the first-contact of an earlier command on this machine ({state})")
            if folder != state:
                shutil.copytree(state, folder, dirs_exist_ok=True)
        else:
            shutil.rmtree(state)
    report = Report(folder, "python -m bench.gpu_plan " + " ".join(sys.argv[1:]), dry, mirror=state)
    report.data["environment"] = info
    if previous:
        report.data["parts"] = previous["parts"]
    report.save()
    say(f"first-contact into {folder}: {info.get('gpu') or 'CPU'}, torch {info['torch']}, triton {info['triton']}, "
        f"budget {args.budget_seconds:.0f} s")

    # 1. the compiled kernel tests (bf16/fp16 against PyTorch's own error) and the captured step
    start = time.monotonic()
    timeout = min(150.0, clock.left() * 0.3)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
               "tests/test_steps.py"]
    test_env = {**env, "TRITON_INTERPRET": "1" if dry else "0"}
    if dry:
        stand_in("the gpu-marked tests need a CUDA GPU: they run here only to show they collect and skip")
    if report.earlier(previous, "kernel-tests", "pass"):
        passed = True
        say("part kernel-tests: passed in an earlier command on this machine")
    else:
        (folder / "pytest-gpu.log").unlink(missing_ok=True)
        result = run_logged(command, folder / "pytest-gpu.log", timeout, test_env)
        # cut short by its time cap (cold compiles) with no failure so far: incomplete, not failed;
        # the unit-error check below judges the kernels' bf16/fp16 accuracy as well
        failed = any(word in (folder / "pytest-gpu.log").read_text() for word in (" FAILED", " ERROR", "Error:"))
        incomplete = result["timed_out"] and not failed
        passed = (result["returncode"] == 0 and not result["timed_out"]) or incomplete
        status = "stand-in" if dry else "incomplete" if incomplete else "pass" if passed else "FAIL"
        report.part("kernel-tests", status, result["seconds"], returncode=result["returncode"],
                    timed_out=result["timed_out"], log="pytest-gpu.log")

    # 2. kernel errors per unit shape and dtype against float64, the layer-path table (bench.gpu_report)
    start = time.monotonic()
    if dry:
        stand_in("bench.gpu_report's correctness check and layer-path timing need CUDA events: one entry each")
        report.data["correctness"] = [{"shape": "stand-in", "dtype": "float32", "pass": True, "stand_in": True}]
        report.data["correctness_pass"] = True
        report.data["conv_paths"] = {"stand-in (dry run)": {"bfloat16": {}}}
        report.part("kernel-errors", "stand-in", time.monotonic() - start)
        report.part("layer-paths", "stand-in", 0.0)
    else:
        from bench import gpu_report

        if report.earlier(previous, "kernel-errors", "pass"):
            report.data["correctness"], report.data["correctness_pass"] = previous["correctness"], True
        else:
            share = min(90.0, clock.left() * 0.2)
            # gpu_report's correctness part uses the first 20% of its clock's budget
            rows, _ = gpu_report.check_correctness(gpu_report.Clock(share / gpu_report.CORRECTNESS_SHARE))
            # judged on the checks that ran (bf16 first, then fp16, fp32): rows left for lack of time
            # are counted, not failed, as long as every shape was checked in bf16
            checked = [row for row in rows if "skipped" not in row]
            bf16_shapes = {row["shape"] for row in checked if row["dtype"] == "bfloat16"}
            ok = all(row["pass"] for row in checked) and bf16_shapes == {row["shape"] for row in rows}
            report.data["correctness"], report.data["correctness_pass"] = rows, ok
            report.part("kernel-errors", "pass" if ok else "FAIL", time.monotonic() - start,
                        note=f"{len(checked)} of {len(rows)} shape x dtype checks ran")
        start = time.monotonic()
        if report.earlier(previous, "layer-paths", "done"):
            report.data["conv_paths"] = previous["conv_paths"]
        else:
            share = min(75.0, clock.left() * 0.2)
            # its layer-path part starts new layers while less than 35% of its budget is spent
            paths_clock = gpu_report.Clock(share / (gpu_report.CORRECTNESS_SHARE + gpu_report.PATHS_SHARE))
            report.data["conv_paths"] = gpu_report.choose_conv_paths(paths_clock, args.batch_size)
            write_json(folder / "conv_paths.json", report.data["conv_paths"])
            report.part("layer-paths", "done", time.monotonic() - start)
        os.environ["PRERESNET_CONV_PATHS"] = str((folder / "conv_paths.json").resolve())  # the fused rows use it

    # 3. the launch-configuration search (bench/config_search.py, when it is in this checkout)
    start = time.monotonic()
    search = ROOT / "bench" / "config_search.py"
    if not search.is_file():
        report.part("config-search", "skipped", 0.0, note="bench/config_search.py is not in this checkout yet")
    elif report.earlier(previous, "config-search", "done"):
        report.data["launch_configs"] = previous["launch_configs"]
        from preresnet.kernels import launch_configs

        os.environ[launch_configs.TABLE_ENV] = str((folder / "launch_configs.json").resolve())
    elif dry:
        stand_in("the launch-configuration search times kernels on a GPU: only its --help runs here")
        result = run_logged([sys.executable, "-m", "bench.config_search", "--help"], folder / "config-search.log",
                            min(60.0, clock.left()), env)
        report.part("config-search", "stand-in" if result["returncode"] == 0 else "FAIL", result["seconds"],
                    log="config-search.log")
    else:
        # as bench.gpu_report runs it: in this process, the result in report.json for render_results
        # (kernels/launch_configs.json) and in force for the fused rows of the matrix
        seconds = min(120.0, clock.left() * 0.3)
        try:
            from bench import config_search
            from preresnet.kernels import launch_configs

            report.data["launch_configs"] = config_search.run_on_gpu(seconds, args.batch_size)
            (folder / "launch_configs.json").write_text(
                launch_configs.table_json(config_search.table_from(report.data["launch_configs"])))
            os.environ[launch_configs.TABLE_ENV] = str((folder / "launch_configs.json").resolve())
            launch_configs.clear_cache()
            report.part("config-search", "done", time.monotonic() - start)
        except Exception as exc:  # the matrix still runs, on the default launch configurations
            report.part("config-search", "FAIL", time.monotonic() - start, note=repr(exc)[:300])

    # the verdict on the kernels, saved now: a command cut short in the matrix keeps it
    ok = passed and report.data["correctness_pass"]
    report.data["passed"] = ok and not dry
    report.save()

    # 4. the compact speed matrix, one process per network (a crash loses that network's rest only)
    start = time.monotonic()
    rows_file = folder / "matrix-rows.jsonl"
    kept = keep_measured_rows(rows_file, previous)
    models = ("tiny",) if dry else MATRIX_MODELS
    env = cache_env(work)  # now with the fresh layer-path and launch-config tables
    for name in models:
        pending = [v for v in VARIANTS if not any(r["model"] == name and r["variant"] == v for r in kept)]
        while pending and clock.left() > 20:
            command = [sys.executable, "-m", "bench.gpu_plan", "_matrix", "--model", name, "--variants", ",".join(pending),
                       "--rows", str(rows_file), "--seconds", str(int(max_share(clock, name, models)))]
            if dry:
                command.append("--dry-run")
            result = run_logged(command, folder / "matrix.log",
                                min(max_share(clock, name, models) + 30, max(clock.left() - 5, 10)), env)
            done = {row["variant"] for row in read_rows(rows_file) if row["model"] == name}
            started = [row for row in read_rows(rows_file, status="started") if row["model"] == name]
            if result["returncode"] != 0 and started and started[-1]["variant"] not in done:
                crashed = started[-1]["variant"]
                append_row(rows_file, {"model": name, "variant": crashed, "provider": crashed,
                                       "error": f"the process ended with status {result['returncode']} (matrix.log)"})
                done.add(crashed)
            progress = [v for v in pending if v in done]
            pending = [v for v in pending if v not in done]
            if result["returncode"] == 0 or result["timed_out"]:
                break
            if not progress:  # the process died before its first row (at import, say): nothing to retry
                for variant in pending:
                    append_row(rows_file, {"model": name, "variant": variant, "provider": variant,
                                           "error": f"the process ended with status {result['returncode']} (matrix.log)"})
                break
        report.data["matrix"]["models"] = matrix_rows(rows_file)
        # the choice as soon as its network is measured, saved: a kill later keeps it
        report.data["choice"] = choose_variant(report.data["matrix"]["models"], "tiny" if dry else "preresnet110")
        report.save()
    choice = report.data["choice"] = choose_variant(report.data["matrix"]["models"], "tiny" if dry else "preresnet110")
    report.part("speed-matrix", "stand-in" if dry else "done", time.monotonic() - start,
                note=f"fastest correct for the reproduction: {choice['variant'] if choice else 'none'}")

    # 5. packing: aggregate images/s of K packed runs in each network's fastest correct variant
    start = time.monotonic()
    rows_file = folder / "packing-rows.jsonl"
    kept = keep_measured_rows(rows_file, previous)
    report.data["packing"] = {}
    for name in models:
        counts = PACKING_COUNTS.get(name, (1, 2))
        variant = (choose_variant(report.data["matrix"]["models"], name) or choice or {}).get("variant")
        if variant is None:
            report.data["packing"][name] = {"skipped": "no correct variant in the speed matrix"}
            continue
        pending = [k for k in counts if not any(r["model"] == name and r["runs"] == k and r["variant"] == variant
                                                for r in kept)]
        if pending and clock.left() > 20:
            seconds = max(10.0, (clock.left() - 10) / (len(models) - list(models).index(name)))
            command = [sys.executable, "-m", "bench.gpu_plan", "_packing", "--model", name, "--variant", variant,
                       "--counts", ",".join(map(str, pending)), "--rows", str(rows_file), "--seconds", str(int(seconds))]
            run_logged(command + (["--dry-run"] if dry else []), folder / "packing.log",
                       min(seconds + 30, max(clock.left() - 5, 10)), env)
        rows = [row for row in read_rows(rows_file) if row["model"] == name and row["variant"] == variant]
        report.data["packing"][name] = {"variant": variant, "rows": rows, "choice": choose_packing(rows)}
        report.save()
    report.part("packing", "stand-in" if dry else "done", time.monotonic() - start,
                note=", ".join(f"{name}: {entry.get('choice')}" for name, entry in report.data["packing"].items()))
    report.data["seconds"] = clock.elapsed()
    report.save()
    verdict = "dry run done (stand-ins: nothing is passed on a CPU)" if dry else "PASSED" if ok else "NOT passed"
    say(f"first-contact {verdict} in {clock.elapsed():.0f} s: {folder}")
    return 0 if ok else 1


def max_share(clock: Clock, name: str, models) -> float:
    """Seconds for this network's rows: an equal share of what is left among the networks to go,
    less the quarter kept for the packing part that follows."""
    remaining = list(models)[list(models).index(name):]
    return max(10.0, (0.75 * clock.left() - 10) / len(remaining))


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
    from bench.floors import fraction_of_floor
    from bench.gpu_report import add_speedups

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
            "flags": variant_flags(best["variant"]), "env": variant_env(best["variant"])}


def variant_flags(variant: str) -> list[str]:
    v = VARIANTS[variant]
    return [f"--amp={v['amp']}", "--channels-last" if v["channels_last"] else "--no-channels-last",
            "--compile" if v["compile"] else "--no-compile", "--fused" if v["fused"] else "--no-fused",
            "--cuda-graphs" if v["cuda_graphs"] else "--no-cuda-graphs"]


def variant_env(variant: str) -> dict:
    mode = VARIANTS[variant].get("graph_mode")
    return {"PRERESNET_GRAPH_MODE": mode} if mode else {}


def variant_settings(variant: str, dry: bool) -> tuple[dict, list[str]]:
    """A speed-matrix variant's execution settings; in a dry run the CPU stand-ins for what needs a
    GPU, with notes saying so."""
    v, notes = dict(VARIANTS[variant]), []
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
    import torch

    from bench.workloads import packed_training_steps
    from preresnet.steps import GRAPH_MODE_ENV
    from preresnet.training import Runtime

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
    import torch

    from preresnet import build_model, get_model
    from preresnet.recipes import resolve_recipe
    from preresnet.steps import GRAPH_MODE_ENV, make_optimizer
    from preresnet.training import Runtime, make_step_fn

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    batch = 8 if dry else 128
    size = 16 if dry else 32
    steps = 3 if dry else MATRIX_STEPS
    clock = Clock(args.seconds)
    rows_file = Path(args.rows)
    for variant in args.variants.split(","):
        v = dict(VARIANTS[variant])
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
                from preresnet.kernels.paths import assign_paths

                assign_paths(model, device, torch.bfloat16)
            memory_format = torch.channels_last if v["channels_last"] else torch.contiguous_format
            model.to(device, memory_format=memory_format)
            runtime = Runtime(device=device, amp=v["amp"], channels_last=v["channels_last"], compile=v["compile"],
                              loader="torch", fused=v["fused"], cuda_graphs=v["cuda_graphs"])
            recipe = resolve_recipe(NETWORKS.get(args.model, ("", 0, 0, "paper"))[3])
            optimizer = make_optimizer(model, recipe, device)
            step, _ = make_step_fn(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), runtime)
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


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_contact_markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = [f"# first-contact {data['date']}{' (DRY RUN on the CPU: stand-ins, no GPU figure)' if data['dry_run'] else ''}",
             "", f"{env.get('gpu') or 'CPU'}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, commit {env.get('commit')}, kernels {data['kernels_digest']}", "",
             f"Command: `{data['command']}`", "", "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    for part in data["parts"]:
        lines.append(f"| {part['name']} | {part['status']} | {part['seconds']} | {part.get('note', part.get('log', ''))} |")
    checks = data.get("correctness", [])
    if checks:
        failed = [row for row in checks if not row.get("pass")]
        lines += ["", f"## Kernel errors: {len(checks) - len(failed)} of {len(checks)} checks pass "
                      "(fused error at most 3x PyTorch's, against float64)", ""]
        lines += [f"- {row['shape']} {row['dtype']}: {row.get('error') or row.get('skipped') or 'FAIL'}" for row in failed]
    for gpu, dtypes in data.get("conv_paths", {}).items():
        for dtype, entries in dtypes.items():
            lines += ["", f"## Layer paths ({gpu}, {dtype}, forward + backward, ms)", "",
                      "| layer | Triton | PyTorch | kept |", "| --- | --- | --- | --- |"]
            for key, entry in entries.items():
                timed = f"{entry['triton_ms']:.3f} | {entry['torch_ms']:.3f}" if "triton_ms" in entry \
                    else f"{entry.get('skipped') or entry.get('error')} |"
                lines.append(f"| {key} | {timed} | {entry['path']} |")
    if data.get("launch_configs"):
        from bench import config_search

        lines += config_search.markdown_lines(data["launch_configs"])
    rows = data["matrix"]["models"]
    if rows:
        lines += ["", "## Training step of train.py (batch %s)" % rows[0].get("batch"), "",
                  "| model | variant | images/s | vs eager-fp32 | vs compile | first step s | capture s | losses vs eager-amp-cl | captured |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            if "images_per_second" in row:
                def fmt(key, pattern="{:.2f}x"):
                    return pattern.format(row[key]) if row.get(key) is not None else "-"
                check = f"{100 * row['loss_rel_diff']:.2f}% {'ok' if row.get('correct') else 'DIFFERS'}" \
                    if "loss_rel_diff" in row else "-"
                lines.append(f"| {row['model']} | {row['variant']} | {row['images_per_second']:,.0f} | "
                             f"{fmt('speedup_over_eager-fp32')} | {fmt('speedup_over_compile')} | "
                             f"{fmt('compile_seconds', '{:.1f}')} | {fmt('capture_seconds', '{:.2f}')} | {check} | "
                             f"{'yes' if row.get('captured') else 'no'} |")
            else:
                lines.append(f"| {row['model']} | {row['variant']} | {row.get('skipped') or row.get('error')} | | | | | | |")
    if data.get("packing"):
        lines += ["", "## Packed runs (train.py --seeds): aggregate training images/s", "",
                  "| model | variant | runs | images/s in all | vs 1 run | peak memory | ms a round |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, entry in data["packing"].items():
            rows = entry.get("rows", [])
            single = next((row["images_per_second"] for row in rows if row["runs"] == 1 and "images_per_second" in row),
                          None)
            for row in rows:
                if "images_per_second" not in row:
                    lines.append(f"| {name} | {row['variant']} | {row['runs']} | {row.get('skipped') or row.get('error')} "
                                 f"| | | |")
                    continue
                memory = f"{row['peak_memory_bytes'] / 2 ** 30:.1f} GiB" if "peak_memory_bytes" in row else "-"
                ratio = f"{row['images_per_second'] / single:.2f}x" if single else "-"
                lines.append(f"| {name} | {row['variant']} | {row['runs']} | {row['images_per_second']:,.0f} | {ratio} | "
                             f"{memory} | {row['ms']:.1f} |")
            if "choice" in entry:
                lines.append(f"| {name} | | **choice: {entry['choice']}** | | | | |")
    if data.get("choice"):
        choice = data["choice"]
        lines += ["", f"Fastest correct for the reproduction: **{choice['variant']}** "
                      f"({choice['images_per_second']:,.0f} images/s): `{' '.join(choice['flags'])}`"]
    return "\n".join(lines) + "\n"


# --- reproduce ----------------------------------------------------------------------------------------


def run_name(model: str, dry: bool, device: str = "cuda") -> str:
    if dry:
        return f"dryrun-{model}"
    return f"{model}-{NETWORKS[model][3]}-cifar10-jpeg" + ("-cpu" if device == "cpu" else "")


def seed_folder(seed: int) -> str:
    """The run folder of one seed inside a reproduction (train.py --seeds names them so too)."""
    return f"seed-{seed}"


def passed_reports(results_dirs) -> list[dict]:
    """The first-contact reports that passed on the current kernels (a choice made on other kernels
    may be wrong on these), oldest first."""
    digest = kernels_digest()
    reports = []
    for results in results_dirs:
        for path in Path(results).glob("*/report.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("stage") == "first-contact" and data.get("passed") and data.get("kernels_digest") == digest:
                reports.append(data)
    return sorted(reports, key=lambda data: data["date"])


def newest_choice(results_dirs) -> dict | None:
    """The speed choice of the newest first-contact report that passed on the current kernels."""
    choices = [data["choice"] for data in passed_reports(results_dirs) if data.get("choice")]
    return choices[-1] if choices else None


def checkpoint_epoch(path: Path) -> int:
    if not path.is_file():
        return -1
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return -1


def prepare_data(args, work: Path) -> Path:
    """The extracted dataset under the work folder (kept while the machine is warm)."""
    target = work / ("dry-data" if args.dry_run else "cifar10-jpeg")
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    archive = Path(args.data_archive)
    if args.dry_run and not archive.is_file():
        stand_in(f"a synthetic 4-class folder dataset in place of {DATA_DESCRIPTION}")
        archive = work / "dry-data.tar.gz"
        make_synthetic_archive(archive)
    if not archive.is_file():
        raise SystemExit(f"gpu_plan: error: {archive} is missing: copy ../shared/data/cifar10-jpeg.tar.gz to "
                         f"data/ and carry it (bench/README.md)")
    tmp = work / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    # the archive holds train/ and test/, possibly under one top folder
    root = tmp if (tmp / "train").is_dir() else next(p for p in tmp.iterdir() if (p / "train").is_dir())
    root.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_synthetic_archive(path: Path, per_class: int = 12) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    staging = path.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for c, name in enumerate(("a", "b", "c", "d")):
            folder = staging / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, size=(32, 32, 3))
                image[8 * c: 8 * c + 8] = 200 + 10 * c  # a class-specific band: learnable at once
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")
    with tarfile.open(path, "w:gz") as tar:
        for sub in ("train", "test"):
            tar.add(staging / sub, arcname=sub)
    shutil.rmtree(staging)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def export_weights(local: Path, results: Path, dry: bool, env: dict, clock: Clock) -> dict:
    """A finished seed's final weights as an entry of the weights registry (preresnet/pretrained.py:
    the file, its test error and per-class accuracy measured on it, card and curves), named
    NETWORK-DATA-RECIPE-DEVICE-sSEED. It goes to the registry of the tree the results return to:
    the return tree's preresnet/weights on the GPU machine (bench.returning), else this checkout's; a
    dry run's (synthetic data) to
    the results root's weights/, never to a registry the package reads. The export runs as its own
    process: a failure is recorded, and the checkpoint kept for `python -m preresnet.export` by hand."""
    from bench.workloads import environment
    from preresnet.pretrained import registry_name

    config = json.loads((local / "config.json").read_text())
    on_gpu = config["runtime"]["device"].startswith("cuda")
    info = environment("cuda" if on_gpu else "cpu")
    arch, seed = (config["type"], config["depth"], config["width"]), config["seed"]
    model = next((key for key, spec in NETWORKS.items() if spec[:3] == arch), None)
    network = registry_name(*arch) or config["model"].lower().replace("-", "")
    name = f"{network}-{'synthetic' if dry else 'cifar10jpeg'}-{config['recipe_name']}-{'gpu' if on_gpu else 'cpu'}-s{seed}"
    # on a CPU with the threads its epochs were timed with (bench/README.md); the stage's default is 1
    stage = ["--dry-run"] if dry else ["--model", model] + ([] if on_gpu else ["--device", "cpu", "--threads", "2"])
    if dry:
        registry = results.parents[2] / "weights"
    else:
        registry = (returning.tree() or ROOT) / "preresnet" / "weights"
    command = [sys.executable, "-m", "preresnet.export", str(local), "--registry", str(registry),
               "--name", name, "--data", "synthetic (dry run)" if dry else DATA_DESCRIPTION,
               "--data-dir", config["data_dir"] if dry else USER_DATA_DIR,
               "--device", info.get("gpu") or f"CPU ({info['cpu']})",
               "--reproduce", " ".join(["python -m bench.gpu_plan reproduce", *stage, "--seeds", str(seed)]),
               "--source", str(results) if dry else f"bench/results/reproduce/{results.parent.name}/{results.name}"]
    command += ["--commit", info["commit"]] if info["commit"] else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(60, clock.left()))
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode != 0:
        return {"entry": name, "export_error": done.stderr.strip()[-300:]}
    meta = json.loads((registry / f"{name}.json").read_text())
    return {"entry": name, "file": meta["file"], "test_error": meta["test_error"], "bytes": meta["bytes"]}


@contextlib.contextmanager
def copying_progress(run: Path, results: Path, every: float = 5.0):
    """While the block runs, copy the run's checkpoint, metrics and curves into results whenever a new
    checkpoint appears, so that what a command returns holds the last finished save even if the
    command is killed before its own end (the run folder itself stays on the machine)."""
    import threading

    stop = threading.Event()
    results.mkdir(parents=True, exist_ok=True)

    def watch():
        seen = None
        while not stop.wait(every):
            checkpoint = run / "checkpoint.pt"
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
            if stamp is None or stamp == seen:
                continue
            seen = stamp
            for file in RUN_FILES:
                if (run / file).is_file():
                    shutil.copy2(run / file, results / f".{file}.copy")
                    os.replace(results / f".{file}.copy", results / file)
            returning.publish()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def reproduce(args) -> int:
    import torch

    from bench.workloads import environment

    dry = args.dry_run
    on_cpu = dry or args.device == "cpu"
    clock = Clock(args.budget_seconds)
    if not on_cpu and not torch.cuda.is_available():
        print("gpu_plan: error: reproduce needs a CUDA GPU (or --device cpu, or --dry-run)", file=sys.stderr)
        return 2
    model = args.model
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = cache_env(work)
    name = run_name(model, dry, "cpu" if on_cpu else "cuda")
    results = Path(args.results) / "reproduce" / name
    committed = COMMITTED_RESULTS / "reproduce" / name
    local = work / "runs" / name
    info = environment("cpu" if on_cpu else "cuda")
    say(f"reproduce {name}: {info.get('gpu') or 'CPU'}, budget {args.budget_seconds:.0f} s")

    summary_path = results / "run.json"
    summary = {}
    for source in (summary_path, committed / "run.json", local / "run.json"):
        if source.is_file():
            candidate = json.loads(source.read_text())
            if len(candidate.get("commands", [])) >= len(summary.get("commands", [])):
                summary = candidate
    seeds = args.seeds or summary.get("seeds") or list(DEFAULT_SEEDS)
    if summary.get("seeds") and args.seeds and args.seeds != summary["seeds"]:
        print(f"gpu_plan: error: {name} trains seeds {summary['seeds']}; --seeds {args.seeds} would change the run",
              file=sys.stderr)
        return 2
    if summary.get("finished"):
        say(f"{name} is finished ({summary['epochs']} epochs, seeds {seeds}): nothing to do; "
            f"`python -m bench.gpu_plan next` names the next stage")
        return 0

    # where each seed's run continues from: this machine's run folder, or the committed (or returned) checkpoint
    for seed in seeds:
        folder = seed_folder(seed)
        candidates = [(checkpoint_epoch(root / folder / "checkpoint.pt"), root / folder)
                      for root in (local, results, committed)]
        epoch, source = max(candidates, key=lambda c: c[0])
        if epoch >= 0 and source != local / folder:
            shutil.rmtree(local / folder, ignore_errors=True)
            (local / folder).mkdir(parents=True)
            for file in RUN_FILES:
                if (source / file).is_file():
                    shutil.copy2(source / file, local / folder / file)
            say(f"{folder}: continuing from {source / 'checkpoint.pt'} (epoch {epoch})")
        elif epoch >= 0:
            say(f"{folder}: continuing this machine's run folder {local / folder} (epoch {epoch})")
        else:
            shutil.rmtree(local / folder, ignore_errors=True)  # nothing to continue: a fresh run
            say(f"{folder}: starting")
    data = prepare_data(args, work)

    kind, depth, width, recipe_name = NETWORKS.get(model, ("normal", 1, 1, "paper"))
    command = [sys.executable, str(ROOT / "train.py"), "--dataset", "folder", "--data-dir", str(data),
               "--recipe", recipe_name, "--loader", "torch", "--no-progress"]
    run_env = dict(env)
    if on_cpu:
        # one OpenMP thread per process unless asked for more: threads that wait for each other while
        # another program holds a core spin, and slow a shared machine's run down many times over
        run_env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if dry:
        stand_in("PreResNet-8 on a synthetic dataset for 3 epochs on the CPU, in place of the paper network on the GPU")
        command += ["--type", "normal", "--depth", "1", "--epochs", "3", "--batch-size", "16"]
        flags = ["--device", "cpu", "--no-cuda-graphs"]
    else:
        command += ["--type", kind, "--depth", str(depth)] + (["--width", str(width)] if kind == "wide" else [])
        flags = execution_flags(args, work, run_env)
    command += flags
    train_seconds = args.train_seconds if args.train_seconds else clock.left() - args.reserve_seconds
    # the first epoch of a command always runs and compiles: less than this loses the window's time
    if train_seconds < (30 if dry else MIN_TRAIN_SECONDS) and not args.train_seconds:
        say(f"only {clock.left():.0f} s left: no training in this command")
        return 1
    results.mkdir(parents=True, exist_ok=True)
    # the seeds train packed, `pack` at a time (first-contact's measured choice), one train.py --seeds
    # command per group; each group's runs are ordinary run folders local/seed-N
    pack = len(seeds) if dry or on_cpu else packing_choice(model, [args.results, COMMITTED_RESULTS, work], len(seeds))
    if not dry and not on_cpu:  # every unfinished run's checkpoint travels with the next command, and back
        room = checkpoint_room(model, committed)
        if room < 1:
            print(f"gpu_plan: error: the checkout and the data leave no room in the {CARRY_LIMIT >> 20} MiB a command "
                  f"takes along for one {model} checkpoint ({checkpoint_bytes(model) / 2**20:.1f} MiB)", file=sys.stderr)
            return 2
        if room < pack:
            say(f"{pack} packed runs' checkpoints would not travel: {room} at a time")
            pack = room
    outcomes = []
    train_start = time.monotonic()
    for group in [seeds[i:i + pack] for i in range(0, len(seeds), pack)]:
        if all(checkpoint_epoch(local / seed_folder(seed) / "checkpoint.pt") == summary_epochs(local / seed_folder(seed))
               for seed in group):
            continue  # this group is finished
        seconds = train_seconds - (time.monotonic() - train_start)
        if seconds < (1 if dry else MIN_TRAIN_SECONDS) and outcomes:
            break
        group_command = command + ["--seeds", ",".join(map(str, group)), "--resume", "auto", "--out", str(local),
                                   "--time-limit", str(max(int(seconds), 1))]
        # a command killed mid-run still returns its runs' last checkpoints
        with contextlib.ExitStack() as watching:
            for seed in group:
                watching.enter_context(copying_progress(local / seed_folder(seed), results / seed_folder(seed)))
            outcomes.append(run_logged(group_command, results / "train.log", seconds + 30, run_env))
        outcomes[-1]["command"] = " ".join(group_command[1:])
    # 143: SIGTERM, the time guard's backstop; train.py saved its position first
    ok = all(outcome["returncode"] in (0, 128 + signal.SIGTERM) for outcome in outcomes)

    runs = {}
    for seed in seeds:
        runs[seed_folder(seed)] = collect_seed(local / seed_folder(seed), results / seed_folder(seed), dry, env, clock)
    commands = summary.get("commands", []) + [{
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": info.get("gpu") or f"CPU ({info['cpu']})",
        "seconds": round(time.monotonic() - train_start, 1),
        "returncodes": [outcome["returncode"] for outcome in outcomes],
        "epochs_after": {folder: run["epochs_done"] for folder, run in runs.items()},
        "commit": info["commit"], "commands": [outcome["command"] for outcome in outcomes],
        **({"threads": args.threads} if on_cpu else {})}]
    config = next((json.loads((local / folder / "config.json").read_text()) for folder in runs
                   if (local / folder / "config.json").is_file()), {})
    finished = all(run["finished"] for run in runs.values())
    errors = [run["final_test_error"] for run in runs.values() if run["final_test_error"] is not None]
    summary = {
        "name": name, "model": model, "network": config.get("model"), "recipe": config.get("recipe_name"),
        "data": DATA_DESCRIPTION if not dry else "synthetic (dry run)", "epochs": config.get("recipe", {}).get("epochs"),
        "seeds": seeds, "epochs_done": min(run["epochs_done"] for run in runs.values()), "finished": finished,
        "runs": runs, "test_error": sweeps.seed_statistics(errors) if finished else None,
        "paper_test_error": PAPER_ERROR.get(model),
        "wall_seconds": round(sum(c["seconds"] for c in commands), 1),
        "flags": flags, "runtime": config.get("runtime"), "device": info.get("gpu") or f"CPU ({info['cpu']})",
        "gpu": info.get("gpu"), "torch": info["torch"], "triton": info["triton"], "cuda": info.get("cuda"),
        "commit": info["commit"], "commands": commands, "dry_run": dry,
    }
    write_json(summary_path, summary)
    returning.publish()
    state = "finished" if finished else f"{summary['epochs_done']} of {summary['epochs']} epochs"
    say(f"reproduce {name}: {state} after {commands[-1]['seconds']:.0f} s of training; results in {results}")
    return 0 if ok else 1


def execution_flags(args, work: Path, run_env: dict) -> list[str]:
    """train.py's execution flags: --flags, else on the CPU fp32 eager, else first-contact's choice
    (its environment added to run_env), else the unfused eager step with CUDA graphs."""
    if args.flags:
        return args.flags.split()
    if args.device == "cpu":
        return list(CPU_FLAGS)
    # this machine's own first-contact too (work/first-contact), in case its results were not copied back yet
    choice = newest_choice([args.results, COMMITTED_RESULTS, work])
    if choice:
        run_env.update(choice.get("env", {}))
        say(f"flags of the fastest correct variant first-contact measured ({choice['variant']}): {' '.join(choice['flags'])}")
        return choice["flags"]
    # the capture the gpu tests cover, without a cold compile in every window
    flags = ["--amp=bf16", "--channels-last", "--no-compile", "--no-fused", "--cuda-graphs"]
    say("no passed first-contact report on these kernels: the unfused eager step with CUDA graphs "
        f"({' '.join(flags)}); run first-contact first to use the fastest correct one")
    return flags


def summary_epochs(run: Path) -> int | None:
    """The epochs of the run's recipe (config.json), or None before it has one."""
    config = run / "config.json"
    return json.loads(config.read_text())["recipe"]["epochs"] if config.is_file() else None


def collect_seed(local: Path, results: Path, dry: bool, env: dict, clock: Clock) -> dict:
    """One seed's state after this command, its files copied into results: config, metrics, curves;
    the checkpoint while unfinished, a weights registry entry (export_weights) once finished."""
    from preresnet.training import read_metrics

    results.mkdir(parents=True, exist_ok=True)
    history = read_metrics(local / "metrics.jsonl")
    done = checkpoint_epoch(local / "checkpoint.pt")
    epochs = summary_epochs(local)
    finished = epochs is not None and done == epochs
    for file in ("metrics.jsonl", "config.json", "curves.png"):
        if (local / file).is_file():
            shutil.copy2(local / file, results / file)
    run = {"epochs_done": done, "finished": finished,
           "final_test_error": history[-1]["test_error"] if finished and history else None,
           "last_test_error": history[-1]["test_error"] if history else None,
           "train_seconds": round(sum(m.get("train_seconds", 0.0) for m in history), 1),
           # training images/s of the epochs that compiled nothing (each command's first epoch compiles)
           "images_per_second": mean([m["images_per_second"] for m in history if "compile_seconds" not in m]
                                     or [m["images_per_second"] for m in history])}
    if finished:
        run["weights"] = export_weights(local, results, dry, env, clock)
    if finished and "export_error" not in run["weights"]:
        (results / "checkpoint.pt").unlink(missing_ok=True)  # the registry entry holds the final weights
    elif done >= 0:  # the newest unfinished checkpoint, or a finished one whose export failed
        shutil.copy2(local / "checkpoint.pt", results / "checkpoint.pt")
    return run


CARRY_LIMIT = 64 * 2**20  # what one command takes along: the checkout with its carried paths
CARRY_MARGIN = 4 * 2**20  # for what the results add (logs, metrics, curves, weights) before the next command


def checkpoint_bytes(model: str) -> int:
    """A checkpoint of the network: weights and momentum in fp32, the buffers, and a little more."""
    import torch

    from preresnet import get_model

    with torch.device("meta"):
        network = get_model(model)
    return 8 * sum(p.numel() for p in network.parameters()) + 4 * sum(b.numel() for b in network.buffers()) + 2**16


def traveling_bytes() -> int:
    """What a command takes to the GPU machine: the checkout's tracked and untracked-not-ignored
    files (git's view here; every file but caches on the GPU machine, whose copy holds only those)
    and the carried data archive."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
        files = [ROOT / name for name in listed if name]
        files.append(DATA_ARCHIVE)
    else:
        files = [path for path in ROOT.rglob("*") if ".git" not in path.parts and "__pycache__" not in path.parts]
    return sum(path.stat().st_size for path in set(files) if path.is_file())


def checkpoint_room(model: str, committed: Path) -> int:
    """How many of the network's checkpoints the next command can take along (and a command bring
    back): the limit less the checkout, the data and a margin, the run's own committed
    checkpoints (which the new ones replace) given back."""
    own = sum(path.stat().st_size for path in committed.glob("seed-*/checkpoint.pt"))
    free = CARRY_LIMIT - CARRY_MARGIN - (traveling_bytes() - own)
    back = returning.MAX_BYTES - CARRY_MARGIN
    return max(0, min(free, back) // checkpoint_bytes(model))


def packing_choice(model: str, results_dirs, seeds: int) -> int:
    """How many runs to pack: the choice of the newest first-contact report that passed on the current
    kernels and measured this network (its packing part), else all the seeds at once."""
    choices = [data["packing"][model]["choice"] for data in passed_reports(results_dirs)
               if data.get("packing", {}).get(model, {}).get("choice")]
    if not choices:
        say(f"no packing measurement for {model} on these kernels: the {seeds} seeds train packed together")
        return seeds
    say(f"{model}: {choices[-1]} runs packed at a time, as first-contact measured fastest")
    return choices[-1]


# --- next -----------------------------------------------------------------------------------------


def next_stage(results_dirs=(COMMITTED_RESULTS,)) -> tuple[str, str]:
    """(stage, why) by the documented order."""
    digest = kernels_digest()
    passed = False
    for results in results_dirs:
        for path in Path(results).glob("*/report.json"):
            data = json.loads(path.read_text())
            passed |= data.get("stage") == "first-contact" and bool(data.get("passed")) \
                and data.get("kernels_digest") == digest
    if not passed:
        return "first-contact", f"no first-contact report has passed on the current kernels ({digest})"
    from bench.dali_stage import measured

    # the loaders on the GPU: one window of their own once first-contact has passed
    due = "" if measured(results_dirs) else ("; due too, in a window of its own: the DALI transfer and the stage "
                                             "dali (bench/README.md, 'DALI on the GPU')")
    for model in ORDER:
        runs = [Path(results) / "reproduce" / run_name(model, False) / "run.json" for results in results_dirs]
        summary = next((json.loads(p.read_text()) for p in runs if p.is_file()), {})
        if not summary.get("finished"):
            done = summary.get("epochs_done", 0)
            room = checkpoint_room(model, COMMITTED_RESULTS / "reproduce" / run_name(model, False))
            return f"reproduce --model {model}", (f"{model}: {max(done, 0)} of {summary.get('epochs') or 'all'} epochs "
                                                  f"done; {room} of its checkpoints can travel at a time{due}")
    return "none", f"every run of the plan is finished{due}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="on the CPU: tiny network, stand-ins for the GPU parts")
    common.add_argument("--results", default=None, help="results root (default bench/results; on the GPU machine the "
                                                         "return tree bundled into $OUT)")
    common.add_argument("--work", default=str(DEFAULT_WORK), help="machine-local state: data, run folders, caches")
    common.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS,
                        help="wall-clock budget of the whole command (default 540)")
    fc = sub.add_parser("first-contact", parents=[common], help="kernel tests, launch configs, layer paths, speed matrix")
    fc.add_argument("--batch-size", type=int, default=128)
    rp = sub.add_parser("reproduce", parents=[common], help="the paper schedule of one network, resumable")
    rp.add_argument("--model", choices=tuple(NETWORKS), default="preresnet110")
    rp.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the same stage on the CPU, fp32 (hours: give --budget-seconds accordingly)")
    rp.add_argument("--threads", type=int, default=1,
                    help="with --device cpu: CPU threads of the training process (default 1: a shared machine's "
                         "other work does not stall it)")
    rp.add_argument("--seeds", type=sweeps.parse_seeds, help="comma-separated seeds, one run each (default 0,1,2, or the "
                                                      "seeds the run was started with)")
    rp.add_argument("--data-archive", default=str(DATA_ARCHIVE), help="the JPEG CIFAR-10 archive (carried)")
    rp.add_argument("--flags", help="train.py execution flags instead of first-contact's choice, with '=': "
                                    "--flags='--no-fused --compile --cuda-graphs'")
    rp.add_argument("--train-seconds", type=float, help="train.py --time-limit (default: the budget left minus the reserve)")
    rp.add_argument("--reserve-seconds", type=float, default=45.0,
                    help="kept after training for copying, export and evaluation (default 45)")
    sub.add_parser("next", help="the next stage by the documented order")
    unpack = sub.add_parser("unpack", help="here, after a device command: check the results it returned and "
                                           "extract them over the checkout (bench/returning.py)")
    unpack.add_argument("source", help="the folder the returned files were copied to (the device's files_at)")
    unpack.add_argument("--into", default=str(ROOT), help="the checkout (default: this one)")
    sub.add_parser("dali", parents=[common], help="DALI's GPU pipeline against the torch loader (bench/dali_stage.py)")
    packing = sub.add_parser("_packing", parents=[common])
    packing.add_argument("--model", required=True)
    packing.add_argument("--variant", required=True)
    packing.add_argument("--counts", required=True)
    packing.add_argument("--rows", required=True)
    packing.add_argument("--seconds", type=float, required=True)
    child = sub.add_parser("_matrix", parents=[common])
    child.add_argument("--model", required=True)
    child.add_argument("--variants", required=True)
    child.add_argument("--rows", required=True)
    child.add_argument("--seconds", type=float, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "unpack":
        written = returning.unpack(Path(args.source), Path(args.into))
        print(f"unpacked {len(written)} files from {args.source} into {args.into}")
        return 0
    if getattr(args, "results", None) is None and args.stage != "next":
        args.results = str(default_results(Path(args.work)) if args.stage in ("first-contact", "reproduce", "dali")
                           else COMMITTED_RESULTS)
    if args.stage == "next":
        stage, why = next_stage()
        print(f"next: python3 -m bench.gpu_plan {stage}   ({why})")
        return 0
    if args.stage == "_matrix":
        return matrix_child(args)
    if args.stage == "_packing":
        return packing_child(args)
    if args.stage == "dali":
        from bench.dali_stage import dali_stage

        return dali_stage(args)
    return first_contact(args) if args.stage == "first-contact" else reproduce(args)


if __name__ == "__main__":
    sys.exit(main())
