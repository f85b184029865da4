"""Several runs of one command (train.py --seeds, and lists for --lr and --weight-decay): their grid,
their folders and the summary over seeds.

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

from .wording import counted

SUMMARY_NAME = "summary.json"
DIVERGED_NAME = "diverged.json"  # in the folder of a packed run whose loss stopped being finite


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
    metrics = folder / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    config = folder / "config.json"
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
    from .training import atomic_write

    summary = summarise(folder, runs)
    atomic_write(Path(folder) / SUMMARY_NAME, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return summary


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


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
