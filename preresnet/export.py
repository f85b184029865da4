"""Make entries of the pretrained-weights registry (preresnet/pretrained.py reads them): export a
finished train.py run, and generate each entry's model card from its NAME.json.

    python -m preresnet.export RUN --name NAME --data TEXT --data-dir DIR [--device TEXT] [--commit SHA]
    python -m preresnet.export --cards                # regenerate every card from its NAME.json

RUN is a finished train.py run's folder (one seed of `train.py --seeds ... --out OUT` is OUT/seed-N);
`python -m bench.render_results --add OUT` then records the results row, which names the entries.
docs/pretrained.md has the naming and the storage.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .cli import OneLineParser, run_main
from .errors import UserError
from .evaluation import evaluate_test_split
from .models import model_from_checkpoint
from .pretrained import ENV_VAR, NAME_PATTERN, WeightsEntry, load_weights, read_entry, registry_dir, weights_file_name
from .provenance import read_commands, triton_version
from .recipes import RECIPES, resolve_recipe
from .registry import paper_name, registry_name
from .runfiles import CONFIG_NAME, CURVES_NAME, atomic_write, checkpoint_path, load_checkpoint, strip_wrappers, write_text
from .runtime import resolve_runtime
from .wording import percent

# bf16 parameters halve what git and the wheel carry; the BatchNorm running statistics, which set the
# eval-mode normalisation and are a small part of the size, stay fp32. The error an entry reports is
# measured on this rounded file.
STORAGE = "bf16 parameters, fp32 BatchNorm statistics"


def train_command(config: dict, data_dir: str) -> str:
    """The train.py command that trains a run of config (a run folder's config.json) again: the
    network (by its registry name where it has one), data, the weights it started from, the recipe
    preset and every field that differs from what the preset gives for the run's epochs (train.py
    scales the milestones and the warm-up with them), the seed, and the execution settings as
    config.json recorded them."""
    model = registry_name(config["type"], config["depth"], config["width"])
    if model:
        words = ["python", "train.py", "--model", model]
    else:  # --units: the units per stage as given (--depth refuses a papers' total depth)
        words = ["python", "train.py", "--type", config["type"], "--units", str(config["depth"])]
        words += ["--width", str(config["width"])] if config["type"] == "wide" else []
    words += ["--dataset", config["dataset"], "--data-dir", data_dir, "--recipe", config["recipe_name"]]
    init = config.get("init")
    if init:  # the entry itself, not DEFAULT, which a later entry can change
        words += ["--init", init["entry"] if init["kind"] == "registry" else init["path"]]
    # the milestones and warm-up as --epochs alone scales them: only the fields that differ from those are flags
    preset = {**asdict(resolve_recipe(config["recipe_name"], epochs=config["recipe"]["epochs"])),
              "epochs": RECIPES[config["recipe_name"]].epochs}
    for key, value in config["recipe"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            value = tuple(value)
        if value == preset[key]:
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    words += ["--seed", str(config["seed"])]
    runtime = config.get("runtime")
    if runtime:
        words += ["--device", runtime["device"].split(":")[0], "--amp", runtime["amp"], "--loader", runtime["loader"]]
        for key in ("channels_last", "compile", "fused", "cuda_graphs"):
            words.append(f"--{'' if runtime[key] else 'no-'}{key.replace('_', '-')}")
        if runtime["processes"] > 1:  # one process per GPU, the batch split between them
            words[:2] = ["torchrun", f"--nproc-per-node={runtime['processes']}", "train.py"]
            words.append("--sync-bn" if runtime["sync_bn"] else "--no-sync-bn")
    return shlex.join(words)


def export(run: str | os.PathLike, registry: str | os.PathLike, name: str, *, data: str, data_dir: str, device: str,
           commit: str | None = None, source: str | None = None) -> WeightsEntry:
    """Make a finished train.py run (its folder or checkpoint) the registry entry `name`: the final
    weights as a plain state_dict without wrapper prefixes (STORAGE), its test error and per-class
    accuracy measured on that file (fp32; the GPU when there is one) over the run's test set, then
    NAME.json, the card and the curves. An earlier entry of the same name is replaced.

    data: what the data is, for people; data_dir: the folder a user passes (the commands name it;
    the measurement reads the run's own); device, commit: where and from what it was trained
    (the run's commands.jsonl names them per command where it has them); source: where the run's
    history lives."""
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"entry name {name!r}: use lower-case letters, digits, '-', '_' and '.'")
    checkpoint = load_checkpoint(run)
    config, recipe, folder = checkpoint["config"], checkpoint["recipe"], checkpoint_path(run).parent
    if checkpoint["epoch"] != recipe["epochs"]:
        raise UserError(f"{checkpoint_path(run)} is at epoch {checkpoint['epoch']} of {recipe['epochs']}: only a "
                        f"finished run's last epoch becomes weights")
    state = {strip_wrappers(key): (value.to(torch.bfloat16) if value.is_floating_point() and "running_" not in key
                                   else value).contiguous()
             for key, value in checkpoint["model"].items()}
    model = model_from_checkpoint({**checkpoint, "model": state}, checkpoint_path(run))
    config = {**config, "recipe": recipe}  # as in the run's config.json, whose copy also holds the execution flags
    if (folder / CONFIG_NAME).is_file():
        config["runtime"] = json.loads((folder / CONFIG_NAME).read_text()).get("runtime")

    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # the file's name holds its sha256: the bytes first, then the file
    torch.save(state, buffer)
    file_bytes = buffer.getvalue()
    sha256 = hashlib.sha256(file_bytes).hexdigest()
    file = registry / weights_file_name(name, sha256)
    atomic_write(file, lambda tmp: tmp.write_bytes(file_bytes))
    arch = (config["type"], config["depth"], config["width"])
    meta = {
        "name": name, "model": registry_name(*arch), "network": paper_name(*arch), "type": arch[0], "depth": arch[1],
        "width": arch[2], "num_classes": config["num_classes"], "classes": config["classes"],
        "data": {"description": data, "dataset": config["dataset"], "data_dir": data_dir},
        "recipe": config["recipe_name"], "recipe_settings": recipe, "seed": config["seed"], "epochs": checkpoint["epoch"],
        "commands": {"train": train_command(config, data_dir),
                     "evaluate": shlex.join(["python", "eval.py", "--weights", name, "--data-dir", data_dir])},
        "source": source, "device": device, "runtime": config.get("runtime"), "commit": commit,
        "torch": torch.__version__, "triton": triton_version(), "mean": config["mean"], "std": config["std"],
        "file": file.name, "sha256": sha256, "bytes": file.stat().st_size, "storage": STORAGE,
        **({"init": config["init"]} if config.get("init") else {}),  # a fine-tuned run's first weights
        "trained_by": [trained_by(command) for command in read_commands(folder)],
    }
    runtime = resolve_runtime("auto", "off", channels_last=False, compile=False, loader="torch")
    load_weights(model, WeightsEntry(name, meta, registry))  # the file as a user loads it
    results, _ = evaluate_test_split(model, config["dataset"], config["data_dir"], config["mean"], config["std"], runtime)
    meta.update(test_error=results["test_error"], test_loss=results["test_loss"],
                per_class_accuracy=results["per_class_accuracy"], test_images=results["test_images"],
                measured={"device": runtime.device.type, "precision": "fp32"},
                training_test_error=(checkpoint.get("metrics") or {}).get("test_error"),
                curves=f"{name}-curves.png" if (folder / CURVES_NAME).is_file() else None,
                date=time.strftime("%Y-%m-%d"))
    if meta["curves"]:
        shutil.copyfile(folder / CURVES_NAME, registry / meta["curves"])
    text = json.dumps(meta, indent=1) + "\n"
    write_text(registry / f"{name}.json", text)
    write_text(registry / f"{name}.md", card(json.loads(text)))  # as write_cards makes it from the file
    for old in registry.glob(f"{name}-*.pt"):  # the file an earlier export of this entry wrote
        if old != file and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{8}}\.pt", old.name):
            old.unlink()
    return WeightsEntry(name, meta, registry)


# --- cards ----------------------------------------------------------------------------------------------


def init_text(init: dict) -> str:
    """Where a fine-tuned entry's first weights came from (train.py --init: config["init"])."""
    where = f"entry `{init['entry']}`" if init["kind"] == "registry" else f"`{init['path']}`"
    return (f"{init['network']} weights of {where} (sha256 `{init['sha256'][:16]}...`), classifier head "
            f"{init['head']}")


TRAINED_BY_FIELDS = ("epochs", "commit", "device", "threads", "amp", "channels_last", "compile", "train_seconds",
                     "wall_seconds", "argv")


def trained_by(command: dict) -> dict:
    """What the card keeps of a command of the run's commands.jsonl."""
    return {key: command.get(key) for key in TRAINED_BY_FIELDS}


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.0f} min"


def trained_by_lines(commands: list[dict]) -> list[str]:
    """The card's table of the commands that trained the run (empty where none was recorded)."""
    if not commands:
        return []
    lines = ["## How it was trained", "",
             f"{len(commands)} train.py command{'s' if len(commands) > 1 else ''}, each continuing where the last "
             f"stopped (the run's commands.jsonl; 'unknown' where a command left no record):", "",
             "| epochs | commit | device | threads | precision | layout | compile | step time | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in commands:
        epochs = f"{c['epochs'][0]}-{c['epochs'][1]}" if c.get("epochs") else "none finished"
        layout = {True: "channels-last", False: "NCHW"}.get(c.get("channels_last"), "unknown")
        lines.append(f"| {epochs} | {c.get('commit') or 'unknown'} | {c.get('device') or 'unknown'} | "
                     f"{c.get('threads') or 'unknown'} | {'fp32' if c.get('amp') == 'off' else c.get('amp') or 'unknown'} | "
                     f"{layout} | {'on' if c.get('compile') else 'off'} | {seconds_text(c.get('train_seconds'))} | "
                     f"{seconds_text(c.get('wall_seconds'))} |")
    return [*lines, ""]


def card(meta: dict) -> str:
    """The model card of an entry: its facts, the curves, and the commands to reproduce, evaluate and load it."""
    name, data, commands = meta["name"], meta["data"], meta["commands"]
    recipe = ", ".join(f"{key} {','.join(map(str, value)) if isinstance(value, list) else value}"
                       for key, value in meta["recipe_settings"].items())
    network = f"{meta['network']} (`{meta['model']}`)" if meta["model"] else meta["network"]
    measured = meta["measured"]
    lines = [
        f"# {name}",
        "",
        f"{network}: `{meta['type']}`, depth {meta['depth']}, width {meta['width']}, {meta['num_classes']} classes, "
        f"trained on {data['description']} with recipe `{meta['recipe']}`, seed {meta['seed']}, {meta['epochs']} epochs.",
        "",
        "| | |",
        "| --- | --- |",
        f"| test error | **{percent(meta['test_error'])}** on {meta['test_images']} test images: the last epoch's "
        f"(no selection on the test set), measured on this file ({measured['precision']}, {measured['device']}) |",
        f"| test error in training | {percent(meta['training_test_error'])} (the last epoch as training measured it, "
        f"before the file's rounding) |",
        f"| data | {data['description']}: `--dataset {data['dataset']} --data-dir {data['data_dir']}` |",
        f"| recipe | `{meta['recipe']}`: {recipe} |",
        f"| normalisation | mean {[round(m, 4) for m in meta['mean']]}, std {[round(s, 4) for s in meta['std']]} "
        f"(of the training images, 0-1 scale) |",
        (f"| fine-tuned from | {init_text(meta['init'])} |" if meta.get("init") else None),
        f"| device | {devices_text(meta)} |",
        f"| commit | {commits_text(meta)} |",
        f"| torch / triton | {meta['torch']} / {meta['triton'] or '-'} |",
        f"| file | `{meta['file']}`, {meta['bytes'] / 1e6:.2f} MB, {meta['storage']}; sha256 `{meta['sha256']}` |",
        f"| history | `{meta['source']}` |" if meta["source"] else None,
        f"| date | {meta['date']} |",
        "",
        "Per-class accuracy:",
        "",
        "| class | accuracy |",
        "| --- | --- |",
        *(f"| {cls} | {percent(accuracy)} |" for cls, accuracy in zip(meta["classes"], meta["per_class_accuracy"])),
        "",
        f"![training curves]({meta['curves']})" if meta["curves"] else None,
        "" if meta["curves"] else None,
        *trained_by_lines(meta.get("trained_by") or []),
        "## Reproduce",
        "",
        "The train.py command that trained it, with the settings its config.json recorded (`--time-limit` and "
        "`--resume` split it into several commands without changing what it computes):",
        "",
        "```bash",
        commands["train"],
        "```",
        "",
        "## Evaluate",
        "",
        "```bash",
        commands["evaluate"],
        "```",
        "",
        "## Load",
        "",
        "```python",
        "import preresnet, torch",
        "",
        f'weights = preresnet.get_weights("{name}")',
        (f'model = preresnet.get_model("{meta["model"]}", weights="{name}")  # eval mode' if meta["model"] else
         f'model = preresnet.build_model("{meta["type"]}", {meta["depth"]}, {meta["width"]}, weights="{name}")  # eval mode'),
        "logits = model(weights.transforms()(images))  # images: uint8 NHWC, or float NCHW in [0, 1]",
        *([f'model = torch.hub.load("path/to/preresnet", "{meta["model"]}", source="local", weights="{name}")']
          if meta["model"] else []),
        "```",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def trained_by_values(meta: dict, key: str) -> list:
    """The distinct values of key over the commands that trained the entry, first seen first."""
    values = []
    for command in meta.get("trained_by") or []:
        if command.get(key) not in values:
            values.append(command.get(key))
    return values


def commits_text(meta: dict) -> str:
    """The commits that trained the entry: every command's (oldest first), else the one export was told."""
    commits = trained_by_values(meta, "commit")
    if commits:
        return ", ".join(commit or "unknown" for commit in commits)
    return meta["commit"] or "unknown"


def devices_text(meta: dict) -> str:
    """The machines that trained the entry, first one first (as the results table names them), else the
    device export was told: a run continued on another machine names both."""
    devices = [device for device in trained_by_values(meta, "device") if device]
    return ", then ".join(devices) if devices else meta["device"]


def write_cards(folder: Path) -> list[Path]:
    """Regenerate the card of every entry in folder from its NAME.json; returns the cards written."""
    written = []
    for path in sorted(folder.glob("*.json")):
        entry = read_entry(path)
        write_text(folder / f"{entry.name}.md", card(entry.meta))
        written.append(folder / f"{entry.name}.md")
    return written


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m preresnet.export", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("run", nargs="?", metavar="RUN", help="the finished run to export: its folder or checkpoint file")
    what.add_argument("--cards", action="store_true", help="regenerate every entry's card (NAME.md) from its NAME.json")
    parser.add_argument("--registry", help=f"the registry folder (default ${ENV_VAR}, else preresnet/weights/)")
    parser.add_argument("--name", help="the entry's name: NETWORK-DATA-RECIPE-DEVICE-sSEED (docs/pretrained.md)")
    parser.add_argument("--data", help="what the data is, for people: \"CIFAR-10 re-encoded as JPEG (lossy; not the "
                                       "papers' data)\"")
    parser.add_argument("--data-dir", help="the data folder a user passes to train.py and eval.py")
    parser.add_argument("--device", help="the GPU (or CPU) it was trained on (default: as the run's commands.jsonl "
                                         "records it)")
    parser.add_argument("--commit", help="the commit it was trained from")
    parser.add_argument("--source", help="where the run's history lives (run.json, metrics, logs)")
    return parser


def main(args: argparse.Namespace) -> None:
    folder = Path(args.registry) if args.registry else registry_dir()
    if args.cards:
        for path in write_cards(folder):
            print(path)
        return
    missing = [flag for flag in ("name", "data", "data_dir") if not getattr(args, flag)]
    if missing:
        raise UserError(f"exporting {args.run} needs {', '.join('--' + flag.replace('_', '-') for flag in missing)}")
    # the machine that trained it, as its commands recorded it (the first, where several did)
    device = args.device or next((c["device"] for c in read_commands(checkpoint_path(args.run).parent) if c.get("device")),
                                 None)
    if device is None:
        raise UserError(f"{args.run} records no device (no commands.jsonl): give --device")
    entry = export(args.run, folder, args.name, data=args.data, data_dir=args.data_dir, device=device,
                   commit=args.commit, source=args.source)
    print(f"{entry.name}: test error {percent(entry.test_error)}, measured on {entry.file}; card {folder / entry.name}.md")


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args(), "python -m preresnet.export"))
