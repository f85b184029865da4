"""The GPU plan's stage `first-contact`: the kernel tests with compiled kernels, the kernels' error
per unit shape, the layer-path table, the launch-configuration search, the speed matrix of
train.py's own step and the packing rows (tools/gpu_plan/README.md, "Stage first-contact").

Its report, report.json in bench.gpu_report's format (so bench.render_results reads its matrix and
layer paths) plus the stage's parts, is rewritten after every part; a second command on the same
warm machine continues from the parts an earlier one finished (same kernels, same GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from bench import config_search, gpu_report
from bench.workloads import environment
from preresnet.kernels import launch_configs
from preresnet.runfiles import write_json, write_text
from tools.gpu_plan import returning
from tools.gpu_plan.common import (
    COMMAND,
    ROOT,
    Clock,
    cache_env,
    child_command,
    gpu_slug,
    kernels_digest,
    run_logged,
    say,
    stand_in,
)
from tools.gpu_plan.matrix import (
    MATRIX_MODELS,
    MATRIX_VARIANTS,
    PACKING_COUNTS,
    append_row,
    choose_packing,
    choose_variant,
    keep_measured_rows,
    matrix_rows,
    read_rows,
)


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
        write_text(self.folder / "report.md", first_contact_markdown(self.data))
        if self.mirror is not None:  # what a later command on this warm machine continues from
            shutil.copytree(self.folder, self.mirror, dirs_exist_ok=True)
        returning.publish()

    def earlier(self, previous: dict | None, name: str, *statuses: str) -> bool:
        """Whether an earlier command on this machine finished this part (same kernels, same GPU)."""
        return bool(previous) and any(p["name"] == name and p["status"] in statuses for p in previous["parts"])



def first_contact(args) -> int:
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
    report = Report(folder, f"{COMMAND} " + " ".join(sys.argv[1:]), dry, mirror=state)
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
        os.environ[launch_configs.TABLE_ENV] = str((folder / "launch_configs.json").resolve())
    elif dry:
        stand_in("the launch-configuration search times kernels on a GPU: only its --help runs here")
        result = run_logged([sys.executable, "-m", "bench.config_search", "--help"], folder / "config-search.log",
                            min(60.0, clock.left()), env)
        report.part("config-search", "stand-in" if result["returncode"] == 0 else "FAIL", result["seconds"],
                    log="config-search.log")
    else:
        # as bench.gpu_report runs it: in this process, the result in report.json for render_results
        # (preresnet/kernels/launch_configs.json) and in force for the fused rows of the matrix
        seconds = min(120.0, clock.left() * 0.3)
        try:
            report.data["launch_configs"] = config_search.run_on_gpu(seconds, args.batch_size)
            write_text(folder / "launch_configs.json",
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
        pending = [v for v in MATRIX_VARIANTS if not any(r["model"] == name and r["variant"] == v for r in kept)]
        while pending and clock.left() > 20:
            command = child_command("_matrix", "--model", name, "--variants", ",".join(pending),
                                    "--rows", str(rows_file), "--seconds", str(int(max_share(clock, name, models))))
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
            command = child_command("_packing", "--model", name, "--variant", variant,
                                    "--counts", ",".join(map(str, pending)), "--rows", str(rows_file),
                                    "--seconds", str(int(seconds)))
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

