"""A results row from train.py's run folder: `python -m bench.render_results --add RUN` records it.

RUN is what `python train.py ... --seeds 0,1,2 --out RUN` wrote (RUN/seed-N, one run per seed) or a
single run's folder. Recording copies each seed's record (config.json, metrics.jsonl,
commands.jsonl, curves.png, and while it trains its newest checkpoint, from which
`train.py --resume` continues it) into bench/results/reproduce/NAME/seed-N and writes NAME/run.json:
the seeds, how far each trained, their final test errors and statistics, the weights entry of
each finished seed (`python -m preresnet.export` makes it), the paper's figure, the machines and
commits of the commands that trained it. A run stopped and resumed any number of times is one
row: its commands are in each seed's commands.jsonl. Recording again updates the row; the seeds
of an earlier record that RUN does not hold (trained elsewhere) stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from preresnet.errors import UserError
from preresnet.export import trained_by
from preresnet.pretrained import registry_entries
from preresnet.provenance import read_commands
from preresnet.registry import PAPER_ERRORS, registry_name
from preresnet.runfiles import CHECKPOINT_NAME, COMMANDS_NAME, CONFIG_NAME, CURVES_NAME, METRICS_NAME, read_metrics
from preresnet.sweeps import seed_statistics

RECORD_FILES = (CONFIG_NAME, METRICS_NAME, COMMANDS_NAME, CURVES_NAME)
DATASET_WORDS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# CIFAR-10's classes in label order: data with them (the archive, or a copy such as the JPEG one) is
# CIFAR-10, whose figures the papers give
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def seed_folders(run: Path) -> dict[str, Path]:
    """The runs RUN holds, by their row folder name (seed-N)."""
    folders = [run] if (run / CONFIG_NAME).is_file() else sorted(path.parent for path in run.glob(f"*/{CONFIG_NAME}"))
    if not folders:
        raise UserError(f"{run} holds no train.py run (no {CONFIG_NAME} in it or in its seed folders)")
    named = {f"seed-{read_config(folder)['seed']}": folder for folder in folders}
    if len(named) != len(folders):
        raise UserError(f"{run} holds runs that share a seed (a grid of lr or weight decay is not one row)")
    return named


def read_config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def row_name(config: dict) -> str:
    """NETWORK-RECIPE-DATA-DEVICE: preresnet164-paper-cifar10-jpeg-cpu."""
    network = registry_name(config["type"], config["depth"], config["width"]) or config["model"].lower()
    data = config["dataset"] if config["dataset"] != "folder" else Path(config["data_dir"]).name
    device = "gpu" if config["runtime"]["device"].startswith("cuda") else "cpu"
    return f"{network}-{config['recipe_name']}-{data}-{device}"


def seed_state(folder: Path) -> dict:
    """How far a seed trained, and its test error at its last epoch (final once it has finished)."""
    config, history = read_config(folder), read_metrics(folder / METRICS_NAME)
    done = history[-1]["epoch"] if history else 0
    finished = done == config["recipe"]["epochs"]
    return {"epochs_done": done, "finished": finished,
            "final_test_error": history[-1]["test_error"] if finished else None,
            "last_test_error": history[-1]["test_error"] if history else None}


def weights_of(folder: Path) -> dict | None:
    """The registry entry exported from this seed: the one whose network and seed are the seed's own
    and whose training commands are the seed's commands.jsonl as preresnet.export records them."""
    config = read_config(folder)
    commands = [trained_by(command) for command in read_commands(folder)]
    for entry in registry_entries():
        meta = entry.meta
        if (entry.architecture == (config["type"], config["depth"], config["width"]) and meta["seed"] == config["seed"]
                and meta.get("trained_by") == commands):
            return {"entry": entry.name, "file": meta["file"], "test_error": meta["test_error"], "bytes": meta["bytes"]}
    return None


def copy_record(source: Path, target: Path, finished: bool) -> None:
    """The seed's record files into target; its checkpoint too while it trains (the newest only), none
    once it has finished (its weights entry holds the final weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES + (CHECKPOINT_NAME,):
        if source.resolve() == target.resolve():
            break
        if (source / name).is_file() and (name != CHECKPOINT_NAME or not finished):
            shutil.copy2(source / name, target / name)
    if finished:
        (target / CHECKPOINT_NAME).unlink(missing_ok=True)


def record_row(run: Path, results: Path, data: str | None = None, name: str | None = None) -> Path:
    """Record RUN as a row under results/reproduce/NAME (default: row_name); returns the row's folder."""
    seeds = seed_folders(run)
    configs = {seed: read_config(folder) for seed, folder in seeds.items()}
    first = next(iter(configs.values()))
    shared = ("type", "depth", "width", "recipe_name", "dataset", "recipe")
    differing = [key for key in shared if any(config[key] != first[key] for config in configs.values())]
    if differing:
        raise UserError(f"the runs of {run} differ in {', '.join(differing)}: a row is one network, recipe and data")
    row = results / "reproduce" / (name or row_name(first))
    previous = json.loads((row / "run.json").read_text()) if (row / "run.json").is_file() else {}
    runs = dict(previous.get("runs", {}))
    for seed, folder in seeds.items():
        state = seed_state(folder)
        copy_record(folder, row / seed, state["finished"])
        weights = weights_of(folder) if state["finished"] else None
        runs[seed] = {**state, **({"weights": weights} if weights else {})}
    runs = dict(sorted(runs.items(), key=lambda item: int(item[0].removeprefix("seed-"))))
    finished = all(seed["finished"] for seed in runs.values())
    entries = [seed["weights"]["entry"] for seed in runs.values() if seed.get("weights")]
    descriptions = {entry.name: entry.meta["data"]["description"] for entry in registry_entries()}
    model = registry_name(first["type"], first["depth"], first["width"])
    record = {
        "name": row.name, "model": model, "network": first["model"], "recipe": first["recipe_name"],
        "data": data or previous.get("data") or next((descriptions[e] for e in entries if e in descriptions), None)
        or DATASET_WORDS.get(first["dataset"], f"the image folder {Path(first['data_dir']).name}"),
        "epochs": first["recipe"]["epochs"], "seeds": [int(seed.removeprefix("seed-")) for seed in runs],
        "epochs_done": min(seed["epochs_done"] for seed in runs.values()), "finished": finished, "runs": runs,
        "test_error": seed_statistics([seed["final_test_error"] for seed in runs.values()]) if finished else None,
        "paper_test_error": PAPER_ERRORS.get(model) if first["classes"] == CIFAR10_CLASSES else None,
        "runtime": first["runtime"],
        **environment_of([command for folder in seeds.values() for command in read_commands(folder)], previous),
        "dry_run": False,
        **({"record_notes": previous["record_notes"]} if previous.get("record_notes") else {}),
    }
    (row / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return row


def environment_of(commands: list[dict], previous: dict) -> dict:
    """The device, torch and commits of the commands that trained the row (its newest command's
    device and torch; every commit, oldest first), an earlier record's where the commands are gone."""
    if not commands:
        return {key: previous.get(key) for key in ("device", "torch", "triton", "commit")}
    commands = sorted(commands, key=lambda c: c.get("started") or "")
    return {"device": commands[-1].get("device"), "torch": commands[-1].get("torch"),
            "triton": commands[-1].get("triton", previous.get("triton")),
            "commit": list(dict.fromkeys(c.get("commit") for c in commands if c.get("commit")))}
