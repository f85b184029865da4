"""Regenerate what is derived from the results under bench/results/: from the GPU reports
(`python -m bench.gpu_report`) the README's performance table, the fused layers' path table
preresnet/kernels/conv_paths.json and preresnet/gpu_defaults.json (what `auto` turns on per GPU);
from the rows under bench/results/reproduce/*/run.json the README's results table.

    python -m bench.render_results                      # rewrite them all
    python -m bench.render_results --check              # exit 1 if one is not up to date
    python -m bench.render_results --add OUT [--data TEXT]   # record train.py's run folder OUT as a row first

None is typed by hand: every README row names the device, commit and date of its report, and each
GPU's tables come from its newest report that measured them.
"""

from __future__ import annotations

import argparse
import calendar
import collections
import json
import math
import sys
import time
from pathlib import Path

from bench.rows import record_row
from preresnet.errors import UserError
from preresnet.provenance import read_commands
from preresnet.runfiles import read_metrics
from preresnet.sweeps import seed_statistics
from preresnet.wording import counted, percent

ROOT = Path(__file__).resolve().parents[1]
CONV_PATHS = ROOT / "preresnet" / "kernels" / "conv_paths.json"
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"
RUNS_START, RUNS_END = "<!-- results-table:start -->", "<!-- results-table:end -->"
GPU_DEFAULTS = ROOT / "preresnet" / "gpu_defaults.json"


def provider_label(row: dict) -> str:
    """The provider, and for the fused ones how many layers the path table moved to PyTorch's ops."""
    moved = row.get("layers_on_torch_ops")
    return f"{row['provider']} ({moved} layers on PyTorch ops)" if moved else row["provider"]


def load_reports(results: Path) -> list[dict]:
    return [{**json.loads(path.read_text()), "path": shown(path)} for path in sorted(results.glob("*/report.json"))]


def shown(path: Path) -> str:
    """A path as the tables name it: from the repository's root where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def table(reports: list[dict]) -> str:
    reports = [report for report in reports if report.get("stage") != "dali"]  # loaders, not training steps
    if not reports:
        return ("No GPU report yet: nothing in this project has run on a GPU. `python -m bench.gpu_report` "
                "on one writes a report; this table is generated from them.")
    lines = ["| model | provider | images/s | vs eager-fp32 | vs compile | of floor | device | commit | date | report |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        env = report["environment"]
        for row in report.get("matrix", {}).get("models", []):
            if "images_per_second" not in row:
                continue
            speedups = [f"{row[key]:.2f}x" if key in row else "-" for key in ("speedup_over_eager-fp32", "speedup_over_compile")]
            lines.append(f"| {row['model']} | {provider_label(row)} | {row['images_per_second']:,.0f} | {' | '.join(speedups)} | "
                         f"{100 * row['fraction_of_floor']:.0f}% | {env.get('gpu')} | {env.get('commit')} | "
                         f"{report['date'][:10]} | {report['path']} |")
    return "\n".join(lines)


def conv_paths(reports: list[dict]) -> str:
    """The path table of kernels.dispatch: per GPU, dtype and layer, the newest report (by folder name,
    which starts with the date) that measured it; an entry skipped for time does not replace a measured one."""
    table: dict = {}
    for report in reports:
        for gpu, dtypes in report.get("conv_paths", {}).items():
            for dtype, entries in dtypes.items():
                known = table.setdefault(gpu, {}).setdefault(dtype, {})
                for key, entry in entries.items():
                    if "skipped" not in entry or key not in known:
                        known[key] = entry
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


# the steps gpu_defaults chooses among: (fused, CUDA graphs) of each, all compiled (the GPU's auto)
DEFAULT_CANDIDATES = {"compile": (False, False), "fused-compile": (True, False), "compile-graphs": (False, True),
                      "fused-compile-graphs": (True, True)}


def gpu_defaults(reports: list[dict]) -> str:
    """preresnet/gpu_defaults.json: per GPU name, whether auto turns on the fused kernels and CUDA
    graphs, from its newest report whose GPU tests and kernel correctness passed and which timed
    train.py's step in every candidate for every network: the candidate with the highest geometric
    mean speed-up over the plain compiled step (which wins ties)."""
    table = {}
    for report in reports:
        gpu = report.get("environment", {}).get("gpu")
        if not gpu or not report.get("correctness_pass") or report.get("tests", {}).get("returncode") != 0:
            continue
        rows = {(row["model"], row["provider"]): row["images_per_second"]
                for row in report.get("matrix", {}).get("models", []) if "images_per_second" in row}
        models = sorted({model for model, _ in rows})
        timed = [name for name in DEFAULT_CANDIDATES if models and all((model, name) in rows for model in models)]
        if "compile" not in timed:
            continue
        speedup = {name: math.prod(rows[model, name] / rows[model, "compile"] for model in models) ** (1 / len(models))
                   for name in timed}
        best = max(timed, key=lambda name: (speedup[name], name == "compile"))
        fused, graphs = DEFAULT_CANDIDATES[best]
        why = (f"{report['path']} ({report['date'][:10]}) timed train.py's step on this GPU: {best} was the fastest "
               f"correct one ({speedup[best]:.2f}x the compiled step, geometric mean over {', '.join(models)})")
        table[gpu] = {"fused": {"on": fused, "reason": why}, "cuda_graphs": {"on": graphs, "reason": why}}
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def between(text: str, start: str, end: str, body: str) -> str:
    """text with what stands between its start and end markers replaced by body (unchanged without them)."""
    if start not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def load_runs(results: Path) -> list[dict]:
    """The reproduction runs under results/reproduce/NAME/: run.json, with the training record of its
    finished seeds (the row's) and, under "in_progress", that of the seeds still training (seeds
    added to a finished row, or a group that has not finished yet)."""
    runs = []
    for path in sorted(results.glob("reproduce/*/run.json")):
        run = json.loads(path.read_text())
        run["path"] = shown(path.parent)
        training = {name: seed for name, seed in run.get("runs", {}).items() if not seed.get("finished")}
        run.update(training_record(path.parent, finished_seeds(run)))
        if training:
            run["in_progress"] = {"seeds": training, **training_record(path.parent, training)}
        runs.append(run)
    return runs


def finished_seeds(run: dict) -> dict[str, dict]:
    """The run's seeds that have trained their whole schedule: the row shows these, and only these."""
    return {name: seed for name, seed in run.get("runs", {}).items() if seed.get("finished")}


def row_statistics(run: dict) -> dict | None:
    """Mean, std and the rest over the finished seeds' last-epoch test errors (None before one finishes)."""
    return seed_statistics([seed["final_test_error"] for seed in finished_seeds(run).values()])


def training_record(folder: Path, seeds: dict) -> dict:
    """How long these seeds trained and how fast, from each seed's metrics.jsonl (which travels with
    every checkpoint, so it survives a command whose own record was lost): training_seconds sums over
    the train.py commands the slowest seed's step time (the seeds of one command train packed, side by
    side; seeds added later trained in commands of their own); images_per_second, a seed's images
    over its step time, averaged over the seeds; the commits (None: unknown), devices (a run resumed
    elsewhere trained on several) and each seed's precision, in the order the commands used them."""
    seconds_by_command = collections.defaultdict(collections.Counter)  # command key -> seed -> seconds
    rates, commits, devices, precision = [], {}, {}, {}  # commits and devices: dicts for their order
    histories = {name: (read_metrics(folder / name), read_commands(folder / name)) for name in seeds}
    keys = command_keys([command for _, commands in histories.values() for command in commands])
    for name, (metrics, commands) in histories.items():
        for line in metrics:
            seconds_by_command[command_key(line, commands, keys)][name] += line.get("train_seconds", 0.0)
        seconds = sum(line.get("train_seconds", 0.0) for line in metrics)
        if seconds:
            rates.append(sum(m["images_per_second"] * m["train_seconds"] for m in metrics) / seconds)
        commits.update(dict.fromkeys(command.get("commit") for command in commands))
        devices.update(dict.fromkeys(command["device"] for command in commands if command.get("device")))
        precision[name] = seed_precision(folder / name, commands)
    total = sum(max(per_seed.values()) for per_seed in seconds_by_command.values())
    return {"training_seconds": total or None, "images_per_second": sum(rates) / len(rates) if rates else None,
            "commits": list(commits), "devices": list(devices), "precision": precision}


SAME_COMMAND_SECONDS = 60  # records of one process started this close together are one command


def command_keys(records: list[dict]) -> dict[tuple, tuple]:
    """One key per train.py command for the (pid, started) of every record that has both: records of
    one process whose starts lie within SAME_COMMAND_SECONDS of the command's first are that
    command's (train.py before provenance.Command stamped each packed run when it was set
    up, a second or so apart; a pid comes back only after much longer)."""
    stamps = sorted({(record["pid"], record["started"]) for record in records
                     if record.get("started") and record.get("pid")},
                    key=lambda stamp: (stamp[0], started_seconds(stamp[1])))
    keys: dict[tuple, tuple] = {}
    first = None
    for pid, started in stamps:
        apart = None if first is None or first[0] != pid else started_seconds(started) - started_seconds(first[1])
        if apart is None or apart > SAME_COMMAND_SECONDS:
            first = (pid, started)
        keys[pid, started] = ("command", *first)
    return keys


def started_seconds(started: str) -> float:
    """A record's start ("2026-12-06 19:49:29 UTC"; older ones have no seconds) as seconds since the epoch."""
    for layout in ("%Y-%m-%d %H:%M:%S %Z", "%Y-%m-%d %H:%M %Z"):
        try:
            return calendar.timegm(time.strptime(started, layout))
        except ValueError:
            continue
    raise ValueError(f"not a command's start: {started!r}")


def command_key(line: dict, commands: list[dict], keys: dict[tuple, tuple]) -> tuple:
    """Which train.py command trained this epoch, as a key the seeds it trained packed share
    (command_keys), found by the line's command index or, in records rebuilt from logs, by the
    epochs each command lists. An epoch of a command with no such record counts as trained side by
    side with the other seeds' such epochs (how the stage trained them)."""
    index = line.get("command")
    if index is None:
        index = next((i for i, c in enumerate(commands)
                      if c.get("epochs") and c["epochs"][0] <= line["epoch"] <= c["epochs"][1]), None)
    record = commands[index] if index is not None and index < len(commands) else {}
    if record.get("started") and record.get("pid"):
        return keys[record["pid"], record["started"]]
    return ("unrecorded", index)


def seed_precision(folder: Path, commands: list[dict]) -> str | None:
    """'fp32', 'bf16', or 'fp32, then bf16' for a seed whose commands changed it; from its commands,
    else its config.json; None when neither says."""
    amps = [c["amp"] for c in commands if c.get("amp")]
    if not amps and (folder / "config.json").is_file():
        amps = [json.loads((folder / "config.json").read_text()).get("runtime", {}).get("amp")]
    names = [{"off": "fp32"}.get(amp, amp) for amp in dict.fromkeys(amps) if amp]
    return ", then ".join(names) or None


def commits_cell(run: dict) -> str:
    """The commits that trained the run, oldest first ('unknown' for commands without a record)."""
    commits = run.get("commits") or ([run["commit"]] if isinstance(run.get("commit"), str) else run.get("commit") or [])
    return ", ".join(commit or "unknown" for commit in commits) or "-"


def devices_cell(run: dict) -> str:
    """The machines that trained the run, first one first; run.json's device when no command names one."""
    return ", then ".join(run.get("devices") or []) or str(run.get("device"))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def seed_words(names) -> str:
    """'seed 0', 'seeds 1 and 2', 'seeds 0, 1 and 2' for run folders seed-N."""
    *numbers, last = [name.replace("seed-", "") for name in names]
    return f"seeds {', '.join(numbers)} and {last}" if numbers else f"seed {last}"


def error_cell(run: dict) -> str:
    """Mean +- std over the finished seeds (last epoch, no selection), then each one's error and precision."""
    stats, precision = row_statistics(run), run.get("precision", {})
    seeds = ", ".join(f"{name.replace('seed-', 's')} {percent(seed['final_test_error'])}"
                      + (f" {precision[name]}" if precision.get(name) else "")
                      for name, seed in finished_seeds(run).items())
    spread = f" ± {percent(stats['std'])}" if stats["std"] is not None else ""
    return f"**{percent(stats['mean'])}**{spread} ({seeds})"


def in_progress_line(run: dict) -> str:
    """The seeds still training: their epochs and training time; where some of the run's seeds have
    finished, which seeds the row above holds and which will join it."""
    training = run["in_progress"]
    epochs = min(max(seed.get("epochs_done") or 0, 0) for seed in training["seeds"].values())
    progress = f"{epochs} of {run.get('epochs')} epochs after {duration(training.get('training_seconds'))} of training"
    devices = devices_cell(training) if training["devices"] else devices_cell(run)
    finished = finished_seeds(run)
    if not finished:
        return (f"In progress: {run.get('network')} ({run.get('recipe')}, {counted(len(training['seeds']), 'seed')}, "
                f"{devices}), {progress} (`{run['path']}`).")
    return (f"In progress: {run.get('network')} ({run.get('recipe')}), {seed_words(training['seeds'])} ({devices}), "
            f"{progress}; they join the row's finished {seed_words(finished)} when they finish (`{run['path']}`).")


def runs_table(runs: list[dict]) -> str:
    """One row per reproduction with a finished seed: the last epoch's test error of every finished
    seed (no selection on the test set), its mean and sample standard deviation, and how many seeds;
    then a line for each run's seeds still training (a row grown by seeds keeps its finished ones)."""
    runs = [run for run in runs if not run.get("dry_run")]
    finished = [run for run in runs if finished_seeds(run)]
    lines = []
    if not finished:
        lines.append("No finished reproduction run yet: `python -m bench.render_results --add OUT` records train.py's "
                     "run folder OUT under `bench/results/reproduce/`; this table is generated from them.")
    else:
        lines += ["| network | recipe | data | test error, mean ± std (each seed, its precision) | seeds | paper | "
                  "training time | images/s a run | device | torch / triton | commits | weights |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in finished:
            # each seed's entry with the error measured on its file (rounded to bf16: what eval.py --weights gives)
            entries = [f"`{seed['weights']['entry']}`" + (f" ({percent(seed['weights']['test_error'])} as stored)"
                                                          if "test_error" in seed["weights"] else "")
                       for seed in finished_seeds(run).values() if "entry" in seed.get("weights", {})]
            paper = percent(run["paper_test_error"]) if run.get("paper_test_error") is not None else "-"
            ips = f"{run['images_per_second']:,.0f}" if run.get("images_per_second") else "-"
            lines.append(f"| {run['network']} | {run['recipe']} | {run['data']} | {error_cell(run)} | "
                         f"{len(finished_seeds(run))} | {paper} | {duration(run.get('training_seconds'))} | {ips} | "
                         f"{devices_cell(run)} | {run.get('torch')} / {run.get('triton') or '-'} | {commits_cell(run)} | "
                         f"{', '.join(entries) or '-'} |")
    training = [f"- {in_progress_line(run)}" for run in runs if run.get("in_progress")]
    lines += ["", *training] if training else []
    return "\n".join(lines)


def render(readme: str, reports: list[dict]) -> str:
    return between(readme, START, END, table(reports))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the generated files are up to date")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--add", metavar="OUT", help="first record train.py's run folder OUT (its --out: OUT/seed-N, "
                                                     "or one run's folder) as a row under RESULTS/reproduce/")
    parser.add_argument("--data", help="with --add: what the data is, for people (default: its weights entries' "
                                       "words, else the dataset's name)")
    parser.add_argument("--name", help="with --add: the row's folder name (default NETWORK-RECIPE-DATA-DEVICE)")
    args = parser.parse_args()
    if args.add:
        try:
            print(f"recorded {record_row(Path(args.add), Path(args.results), args.data, args.name)}")
        except UserError as exc:
            print(f"render_results: error: {exc}", file=sys.stderr)
            return 2
    reports = load_reports(Path(args.results))
    readme = between(render((ROOT / "README.md").read_text(), reports), RUNS_START, RUNS_END,
                     runs_table(load_runs(Path(args.results))))
    outputs = {ROOT / "README.md": readme, CONV_PATHS: conv_paths(reports), GPU_DEFAULTS: gpu_defaults(reports)}
    stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date with bench/results: run python -m bench.render_results",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs[path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
