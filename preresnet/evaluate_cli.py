"""Evaluate a checkpoint written by train.py, the runs of a train.py --seeds command, or an entry of
the pretrained-weights registry, on its test set (only the test split is read).

    python eval.py --checkpoint runs/preresnet-110-cifar10-.../checkpoint.pt
    python eval.py --checkpoint RUN_FOLDER --json
    python eval.py --checkpoint SEEDS_FOLDER        # each run folder of the command, then mean and std
    python eval.py --weights preresnet20-cifar10jpeg-paper-cpu-s0 --data-dir data/cifar10-jpeg
    python eval.py --weights DEFAULT --model preresnet20 --save-logits logits.npz

An installed package has the same command as preresnet-eval. The test data's classes must be the
network's (its config's or entry's "classes"), or some of them: the same names in another order, or
a subset (scored over those classes), are mapped onto the network's order, with a note on stderr; a
class the network does not know is an error.

By default a run is evaluated as its training evaluated it, in the precision and memory layout its
config.json records (bf16 autocast where it trained with it), so that eval.py's figure is the one
training printed; an entry of the registry as its recorded test error was measured (fp32). The
report says which; --amp chooses another.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .cli import OneLineParser, run_main
from .data import data_label
from .errors import UserError
from .evaluation import evaluate_test_split
from .models import build_model, model_from_checkpoint
from .pretrained import WeightsEntry, get_weights
from .registry import list_models
from .runfiles import CHECKPOINT_NAME, load_checkpoint
from .runtime import Runtime, resolve_runtime, saved_runtime
from .sweeps import GridRun, saved_grid, seed_statistics
from .wording import counted, percent


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint file, the run folder holding checkpoint.pt, or the folder of a train.py "
                             "--seeds command (its summary.json and run folders): each run is evaluated, then the "
                             "mean, std, median, min and max of their test errors")
    source.add_argument("--weights", metavar="NAME",
                        help="an entry of the weights registry (preresnet.list_weights(); python -m "
                             "preresnet.pretrained lists them), or DEFAULT with --model: the entry with the lowest "
                             "test error for that network, as get_model(NAME, weights=\"DEFAULT\") loads it; the "
                             "entry's recorded test error is shown beside the measured one")
    parser.add_argument("--model", metavar="NAME",
                        help="with --weights: the network (a name of preresnet.list_models(), such as preresnet20); "
                             "needed by --weights DEFAULT, checked against an entry's network otherwise")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"),
                        help="default: the dataset the run trained on")
    parser.add_argument("--data-dir", help="default: the data folder the run trained on (for --weights, the one the "
                                           "entry names, such as data/cifar10-jpeg)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto: cuda when available")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                        help="autocast precision for evaluation; default: the run's own, as its config.json records it "
                             "(training evaluated each epoch in it), or for --weights the one its recorded test error "
                             "was measured in (fp32); off: fp32; auto: train.py's rule for this device")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                        help="data pipeline: NVIDIA DALI or tensor ops in torch, which give the same batches. Default "
                             "auto: the torch loader (on the CPU DALI was measured no faster; on a GPU DALI's pipeline "
                             "has not yet run: --loader dali takes it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save-logits", metavar="FILE",
                        help="write the test split's logits to FILE, an .npz of logits (N x classes, float32), labels "
                             "(N, int64) and classes (the network's, which the labels and the logits' columns number), "
                             "the images in the data's order; for a --seeds folder one file per run, named FILE with "
                             "the run's folder name before the suffix (logits-seed-0.npz)")
    return parser


class Source(NamedTuple):
    """A network to evaluate and the facts of its training that evaluation needs."""

    model: torch.nn.Module
    classes: list[str]  # the network's, in its order
    mean: list[float]
    std: list[float]
    epoch: int
    dataset: str
    data_dir: str
    fields: dict  # where it comes from, first in the report
    recorded: dict  # how it was evaluated where its figure comes from: amp, channels_last, and "where" (words)
    entry: WeightsEntry | None = None


AMP_OF_PRECISION = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}  # an entry's measured precision as --amp


def weights_source(name: str, model_name: str | None) -> Source:
    if name == "DEFAULT" and model_name is None:
        raise UserError("--weights DEFAULT is the entry with the lowest test error of a network: name the network "
                        f"with --model NAME (one of {', '.join(list_models())})")
    entry = get_weights(name, model_name)
    meta = entry.meta
    model_type, units, width = entry.architecture
    precision = meta["measured"]["precision"]
    recorded = {"amp": AMP_OF_PRECISION.get(precision, "off"), "channels_last": False,
                "where": "as the entry's test error was measured"}
    return Source(build_model(model_type, units=units, width=width, weights=entry), meta["classes"], meta["mean"], meta["std"],
                  meta["epochs"], meta["data"]["dataset"], meta["data"]["data_dir"],
                  {"weights": entry.name, "recorded_test_error": entry.test_error}, recorded, entry)


def checkpoint_source(path: str | Path) -> Source:
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    return Source(model_from_checkpoint(checkpoint, path), config["classes"], config["mean"], config["std"],
                  checkpoint["epoch"], config["dataset"], config["data_dir"], {"checkpoint": str(path)},
                  run_runtime(path))


def run_runtime(path: str | Path) -> dict:
    """How a run's training evaluated it: the precision and layout its config.json records (fp32 and
    NCHW where there is none: a checkpoint file outside its run folder)."""
    saved = saved_runtime(path)
    if not saved or saved.get("amp") not in AMP_OF_PRECISION.values():
        return {"amp": "off", "channels_last": False, "where": "no config.json records the run's precision"}
    return {"amp": saved["amp"], "channels_last": bool(saved.get("channels_last")),
            "where": "as the run trained and evaluated, by its config.json"}


def source_runtime(source: Source, args: argparse.Namespace) -> tuple[Runtime, str]:
    """The runtime that evaluates source, and its precision in words for the report: --amp where
    given, else the precision source's figures were measured in; the memory layout they were
    measured in either way."""
    recorded = source.recorded
    runtime = resolve_runtime(args.device, args.amp or recorded["amp"], channels_last=recorded["channels_last"],
                              compile=False, loader=args.loader)
    if args.amp is not None:
        return runtime, f"{precision_name(runtime.amp)} (--amp {args.amp})"
    hint = "; --amp off for fp32" if runtime.amp != "off" else ""
    return runtime, f"{precision_name(runtime.amp)}, {recorded['where']}{hint}"


def precision_name(amp: str) -> str:
    return "fp32" if amp == "off" else f"{amp} autocast"


def seeds_runs(path: Path) -> list[GridRun] | None:
    """The runs of the train.py --seeds command whose folder path is, or None for any other path."""
    if not path.is_dir() or (path / CHECKPOINT_NAME).is_file():
        return None
    try:
        return saved_grid(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}/summary.json is unreadable ({type(exc).__name__}: {exc}); evaluate its run folders "
                        f"one at a time with --checkpoint {path}/RUN") from None


def evaluate_source(source: Source, args: argparse.Namespace, logits_path: Path | None) -> dict:
    """source's report on its test split (or the one --dataset/--data-dir name), its logits written
    to logits_path where given."""
    dataset = args.dataset or source.dataset
    data_dir = str(Path(args.data_dir or source.data_dir).resolve())
    runtime, precision = source_runtime(source, args)
    results, split = evaluate_test_split(source.model, dataset, data_dir, source.mean, source.std, runtime,
                                         args.batch_size, source.classes, keep_logits=logits_path is not None)
    data, network = data_label(dataset, data_dir), source.model.paper_name
    if split.mapped == "reordered":
        print(f"note: {data} holds the classes of {network} in another order; its labels are mapped onto the "
              f"network's order ({', '.join(split.classes)})", file=sys.stderr)
    elif split.mapped == "subset":
        scored = [name for name, accuracy in zip(split.classes, results["per_class_accuracy"]) if accuracy is not None]
        print(f"note: {data} holds {len(scored)} of the {len(split.classes)} classes of {network} "
              f"({', '.join(scored)}): it is scored on those, a prediction of another class counting as an error",
              file=sys.stderr)
    if logits_path is not None:
        save_logits(logits_path, split.logits, split.labels, split.classes)
    return {**source.fields, "model": network, "epoch": source.epoch, "dataset": dataset,
            "data_dir": data_dir, **results, "classes": split.classes, "amp": runtime.amp, "precision": precision,
            **({"logits": str(logits_path)} if logits_path is not None else {})}


def save_logits(path: Path, logits: torch.Tensor, labels: np.ndarray, classes: list[str]) -> None:
    try:
        with open(path, "wb") as f:  # a file object: np.savez adds no .npz to the name asked for
            np.savez(f, logits=logits.numpy(), labels=labels, classes=np.array(classes))
    except OSError as exc:
        raise UserError(f"cannot write logits to {path}: {exc.strerror}") from None


def logits_folder_exists(path: Path) -> None:
    """Checked before evaluating, which can take minutes."""
    if not path.parent.is_dir():
        raise UserError(f"--save-logits {path}: folder {path.parent} does not exist")


def print_report(report: dict, entry: WeightsEntry | None) -> None:
    data = data_label(report["dataset"], report["data_dir"])
    print(f"{report['model']} after {report['epoch']} epochs, {report['test_images']} test images of {data}")
    print(f"test error {100 * report['test_error']:.2f}%   test loss {report['test_loss']:.4f}   ({report['precision']})")
    if entry is not None:
        measured = entry.meta["measured"]
        print(f"recorded in {entry.name}: test error {100 * entry.test_error:.2f}% on {entry.meta['test_images']} "
              f"test images ({measured['precision']} on {measured['device']})")
    print("per-class accuracy:")
    width = max(len(name) for name in report["classes"])
    for name, accuracy in zip(report["classes"], report["per_class_accuracy"]):
        shown = "   n/a" if accuracy is None else f"{100 * accuracy:6.2f}%"
        print(f"  {name:<{width}}  {shown}")
    if "logits" in report:
        print(f"logits written to {report['logits']}")


def run_logits_path(path: Path | None, run: str) -> Path | None:
    """--save-logits FILE for one run of a --seeds folder: FILE with the run's name before its suffix."""
    return None if path is None else path.with_name(f"{path.stem}-{run}{path.suffix}")


def setting(lr: float | None, weight_decay: float | None) -> str:
    """What a group of runs of a grid shares ('' for plain --seeds, whose runs share everything but the seed)."""
    return ", ".join(([f"lr {lr:g}"] if lr is not None else []) +
                     ([f"weight decay {weight_decay:g}"] if weight_decay is not None else []))


def evaluate_seeds(folder: Path, runs: list[GridRun], args: argparse.Namespace, logits_path: Path | None) -> dict:
    """Each run folder of a --seeds command's folder, and per setting of lr and weight decay the
    statistics (sweeps.seed_statistics) of the evaluated runs' test errors."""
    reports = []
    for run in runs:
        path = folder / run.name
        if not (path / CHECKPOINT_NAME).is_file():
            reports.append({"name": run.name, "checkpoint": None})
            continue
        report = evaluate_source(checkpoint_source(path), args, run_logits_path(logits_path, run.name))
        reports.append({"name": run.name, **report})
    evaluated = [report for report in reports if report["checkpoint"] is not None]
    if not evaluated:
        raise UserError(f"no run of {folder} has a checkpoint yet: {', '.join(run.name for run in runs)}")
    by_name = {report["name"]: report for report in evaluated}
    groups = []
    for lr, weight_decay in dict.fromkeys((run.lr, run.weight_decay) for run in runs):
        names = [run.name for run in runs if (run.lr, run.weight_decay) == (lr, weight_decay) and run.name in by_name]
        groups.append({"lr": lr, "weight_decay": weight_decay, "runs": names,
                       "epochs": sorted({by_name[name]["epoch"] for name in names}),
                       "test_error": seed_statistics([by_name[name]["test_error"] for name in names])})
    summary = {"folder": str(folder), "runs": reports, "groups": groups}
    if args.json:
        print(json.dumps(summary))
        return summary
    first = evaluated[0]
    print(f"{first['model']}, {counted(len(runs), 'run')} in {folder}, on the test images of "
          f"{data_label(first['dataset'], first['data_dir'])} ({first['precision']})")
    width = max(len(run.name) for run in runs)
    for report in reports:
        if report["checkpoint"] is None:
            print(f"  {report['name']:<{width}}  no checkpoint yet")
            continue
        logits = f"   logits {report['logits']}" if "logits" in report else ""
        print(f"  {report['name']:<{width}}  epoch {report['epoch']:>4}  test error {percent(report['test_error'])}  "
              f"test loss {report['test_loss']:.4f}{logits}")
    for group in groups:
        stats = group["test_error"]
        if stats is None:
            continue
        spread = f" ± {percent(stats['std'])} (std)" if stats["std"] is not None else ""
        label = setting(group["lr"], group["weight_decay"])
        epochs = group["epochs"]  # runs still in progress stand at other epochs than the finished ones
        at = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {', '.join(map(str, epochs))}"
        print(f"{label + ': ' if label else ''}test error mean {percent(stats['mean'])}{spread}, median "
              f"{percent(stats['median'])}, min {percent(stats['min'])}, max {percent(stats['max'])} over "
              f"{counted(stats['runs'], 'run')} at {at}")
    return summary


def main(args: argparse.Namespace) -> dict:
    if args.model is not None and args.weights is None:
        raise UserError("--model names the network of --weights DEFAULT; a checkpoint's config names its own "
                        "network (leave --model out)")
    logits_path = Path(args.save_logits) if args.save_logits else None
    if logits_path is not None:
        logits_folder_exists(logits_path)
    if args.weights is not None:
        source = weights_source(args.weights, args.model)
    else:
        runs = seeds_runs(Path(args.checkpoint))
        if runs is not None:
            return evaluate_seeds(Path(args.checkpoint), runs, args, logits_path)
        source = checkpoint_source(args.checkpoint)
    report = evaluate_source(source, args, logits_path)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, source.entry)
    return report


def cli(argv: list[str] | None = None, prog: str = "preresnet-eval") -> int:
    """The command (preresnet-eval; eval.py in a checkout calls it with prog="eval.py")."""
    args = build_parser(prog).parse_args(argv)
    return run_main(main, args, prog)
