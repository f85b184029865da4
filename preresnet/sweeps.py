"""Several runs of one command (train.py --seeds, and lists for --lr and --weight-decay): their grid,
their folders, the summary over seeds, and the command that trains them packed in one process.

Each run has an ordinary run folder inside the command's folder, named by what varies:
`seed-0`, or `lr-0.05-wd-0.0005-seed-0` for a grid. `summary.json` there lists every run with its
state, read back from the run folders (so it can be rewritten at any moment, and after a crash),
and, per setting of lr and weight decay, the statistics of the last-epoch test errors of the runs
that finished: no selection on the test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import NamedTuple

import sys

from . import faults
from .data import load_dataset
from .errors import UserError
from .run_setup import check_network, make_folder, new_run, resumed_run, say_start, schedule_steps, write_config
from .runfiles import CHECKPOINT_NAME, CONFIG_NAME, DIVERGED_NAME, METRICS_NAME, read_metrics, write_json
from .runtime import settle_compile
from .training import NonFiniteLoss, RunSpec, train_runs
from .wording import counted, percent

SUMMARY_NAME = "summary.json"


class GridRun(NamedTuple):
    name: str  # the run's folder inside the command's folder
    seed: int
    lr: float | None  # None: the recipe's
    weight_decay: float | None


def parse_seeds(text: str) -> list[int]:
    """--seeds: distinct non-negative seeds, comma-separated (argparse's type)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return seeds


def grid(seeds: list[int], lrs: list[float | None], weight_decays: list[float | None]) -> list[GridRun]:
    """Every seed x lr x weight decay, the seeds of one setting next to each other; folder names
    carry what varies (a list of one value does not vary)."""
    runs = []
    for lr in lrs:
        for weight_decay in weight_decays:
            for seed in seeds:
                parts = ([f"lr-{lr:g}"] if len(lrs) > 1 else []) + \
                        ([f"wd-{weight_decay:g}"] if len(weight_decays) > 1 else []) + [f"seed-{seed}"]
                runs.append(GridRun("-".join(parts), seed, lr, weight_decay))
    return runs


def saved_grid(folder: Path) -> list[GridRun] | None:
    """The runs of the command whose folder this is (its summary.json), or None."""
    path = Path(folder) / SUMMARY_NAME
    if not path.is_file():
        return None
    return [GridRun(run["name"], run["seed"], run["lr"], run["weight_decay"])
            for run in json.loads(path.read_text())["runs"]]


def seed_statistics(errors: list[float]) -> dict | None:
    """Mean, sample standard deviation (n - 1), median, min and max of the runs' last-epoch test errors."""
    if not errors:
        return None
    return {"mean": statistics.fmean(errors), "std": statistics.stdev(errors) if len(errors) > 1 else None,
            "median": statistics.median(errors), "min": min(errors), "max": max(errors), "runs": len(errors)}


def run_state(folder: Path) -> dict:
    """One run's state from its folder: epochs done (of its metrics.jsonl, written with each
    checkpoint), whether it finished, diverged or is in progress, and its last test error."""
    history = read_metrics(folder / METRICS_NAME)
    config = folder / CONFIG_NAME
    recipe = json.loads(config.read_text())["recipe"] if config.is_file() else {}
    epochs = recipe.get("epochs")
    done = history[-1]["epoch"] if history else 0
    if (folder / DIVERGED_NAME).is_file():
        status = "diverged"
    elif epochs is not None and done >= epochs:
        status = "finished"
    else:
        status = "in progress"
    last = history[-1]["test_error"] if history else None
    return {"status": status, "epochs_done": done, "epochs": epochs, "last_test_error": last,
            "final_test_error": last if status == "finished" else None,
            "recipe_lr": recipe.get("lr"), "recipe_weight_decay": recipe.get("weight_decay")}


def summarise(folder: Path, runs: list[GridRun]) -> dict:
    """summary.json of a command's folder: every run's state, and the statistics per setting."""
    entries = [{**run._asdict(), **run_state(Path(folder) / run.name)} for run in runs]
    groups = []
    for lr, weight_decay in dict.fromkeys((run.lr, run.weight_decay) for run in runs):
        mine = [entry for entry in entries if (entry["lr"], entry["weight_decay"]) == (lr, weight_decay)]
        finished = [entry["final_test_error"] for entry in mine if entry["status"] == "finished"]
        groups.append({"lr": lr, "weight_decay": weight_decay, "runs": [entry["name"] for entry in mine],
                       "finished": len(finished), "test_error": seed_statistics(finished)})
    return {"runs": entries, "groups": groups}


def write_summary(folder: Path, runs: list[GridRun]) -> dict:
    summary = summarise(folder, runs)
    write_json(Path(folder) / SUMMARY_NAME, summary)
    return summary


def summary_table(summary: dict) -> str:
    """The printed table: each run's final test error, then per setting mean, std, median, min, max."""
    width = max(len(entry["name"]) for entry in summary["runs"])
    lines = [f"{'run':<{width}}  {'status':<11}  {'epochs':>9}  final test error (last epoch)"]
    for entry in summary["runs"]:
        epochs = f"{entry['epochs_done']}/{entry['epochs'] or '?'}"
        lines.append(f"{entry['name']:<{width}}  {entry['status']:<11}  {epochs:>9}  {percent(entry['final_test_error'])}")
    entries = {entry["name"]: entry for entry in summary["runs"]}
    for group in summary["groups"]:
        first = entries[group["runs"][0]]  # the recipe's values where the command did not list any
        lr, weight_decay = first["recipe_lr"], first["recipe_weight_decay"]
        stats = group["test_error"]
        setting = f"lr {lr:g}, weight decay {weight_decay:g}" if lr is not None else "(no run set up)"
        if stats is None:
            lines.append(f"{setting}: no run finished yet ({counted(len(group['runs']), 'run')})")
            continue
        spread = f"std {percent(stats['std'])}  " if stats["std"] is not None else ""
        lines.append(f"{setting}: mean {percent(stats['mean'])}  {spread}median {percent(stats['median'])}  "
                     f"min {percent(stats['min'])}  max {percent(stats['max'])}  "
                     f"({stats['runs']} of {counted(len(group['runs']), 'run')} finished)")
    return "\n".join(lines)


# --- the command that trains them -------------------------------------------------------------------


def command_grid(args: argparse.Namespace, folder: str | None) -> list[GridRun] | None:
    """The runs of a command with --seeds or lists for --lr / --weight-decay, or of the command
    whose folder is resumed (folder: --resume's, or --out under --resume auto); None: a single run."""
    lrs, weight_decays = args.lr or [None], args.weight_decay or [None]
    listed = args.seeds is not None or len(lrs) > 1 or len(weight_decays) > 1
    if args.seeds is not None and args.seed is not None:
        raise UserError("--seed and --seeds: give one (--seeds 0,1,2 trains one run per seed)")
    if listed and args.resume not in (None, "auto"):
        raise UserError("--resume continues the runs saved in its folder: drop --seeds and the lists (or repeat the "
                        "command with --resume auto --out FOLDER)")
    if listed:
        return grid(args.seeds if args.seeds is not None else [args.seed or 0], lrs, weight_decays)
    return saved_grid(Path(folder)) if folder and Path(folder).is_dir() else None


def run_flags(args: argparse.Namespace, run: GridRun) -> argparse.Namespace:
    """One run's own flags: its seed, lr and weight decay in place of the command's lists."""
    return argparse.Namespace(**{**vars(args), "seed": run.seed, "lr": run.lr, "weight_decay": run.weight_decay,
                                 "seeds": None})


def train_packed(args: argparse.Namespace, runtime, runs: list[GridRun], folder: Path, deadline: float | None,
                 command=None) -> dict:
    """The runs of --seeds (and lists) in one process, each in its own run folder of the command's
    folder (resumed where it holds a checkpoint, else started); summary.json after every epoch, and
    the table over seeds at the end."""

    specs, dataset, skipped = [], None, []
    for run in runs:
        flags = run_flags(args, run)
        if (folder / run.name / CHECKPOINT_NAME).is_file():
            if (folder / run.name / DIVERGED_NAME).is_file():  # it would diverge again, at the same step
                skipped.append(run.name)
                continue
            config, recipe, out, checkpoint = resumed_run(flags, str(folder / run.name))
        else:
            config, recipe, out, dataset = new_run(flags, folder / run.name, dataset)
            checkpoint = None
        if specs and (config["dataset"], config["data_dir"]) != (specs[0].config["dataset"], specs[0].config["data_dir"]):
            raise UserError(f"{out} trained on other data than {specs[0].out}: the runs of one command share their data")
        specs.append(RunSpec(config, recipe, out, checkpoint))
    for name in skipped:
        print(f"{name}: its loss stopped being finite in an earlier command ({folder / name / DIVERGED_NAME}): "
              f"not resumed; --resume {folder / name} continues it alone", file=sys.stderr)
    for spec in specs:
        check_network(spec.config, runtime)
    for out in [folder] + [spec.out for spec in specs]:
        make_folder(out)
    if specs:
        dataset = dataset or load_dataset(specs[0].config["dataset"], specs[0].config["data_dir"])
        runtime = settle_compile(runtime, schedule_steps([spec.recipe for spec in specs], dataset))
    for spec in specs:
        write_config(spec.out, spec.config, spec.recipe, runtime)
    trained = []
    try:
        if specs:
            say_start(specs, dataset)
            trained = train_runs(specs, runtime, dataset, progress=args.progress, deadline=deadline, packed=True,
                                 command=command,
                                 after_epoch=lambda _: write_summary(folder, runs))
            faults.finished()
    finally:
        if specs or skipped:  # nothing written for a command refused before its first run was set up
            summary = write_summary(folder, runs)
            print(summary_table(summary))
    if any(run.status == "paused" for run in trained):
        print(f"stopped by --time-limit; continue with: python train.py --resume {folder}")
    diverged = [entry["name"] for entry in summary["runs"] if entry["status"] == "diverged"]
    if diverged:
        raise NonFiniteLoss(f"the training loss of {', '.join(diverged)} stopped being finite (the other runs went "
                            f"on; {folder / SUMMARY_NAME})")
    return summary
