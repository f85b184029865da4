"""Evaluate a checkpoint written by train.py, or an entry of the pretrained-weights registry, on its test set.

    python eval.py --checkpoint runs/preresnet-110-cifar10-.../checkpoint.pt
    python eval.py --checkpoint RUN_FOLDER --json
    python eval.py --weights preresnet20-cifar10jpeg-paper-cpu-s0 --data-dir data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from preresnet.cli import OneLineParser, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="checkpoint file, or the run folder holding checkpoint.pt")
    source.add_argument("--weights", metavar="NAME",
                        help="an entry of the weights registry (preresnet.list_weights(); python -m preresnet.pretrained "
                             "lists them); its recorded test error is shown beside the measured one")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"),
                        help="default: the dataset the run trained on")
    parser.add_argument("--data-dir", help="default: the data folder the run trained on (for --weights, the one the "
                                           "entry names, such as data/cifar10-jpeg)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto: cuda when available")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="off",
                        help="autocast precision for evaluation (default off: fp32)")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                        help="data pipeline: NVIDIA DALI or tensor ops in torch (default auto: DALI when installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(args: argparse.Namespace) -> dict:
    from preresnet import build_model, get_weights
    from preresnet.data import data_label
    from preresnet.pretrained import evaluate_test_split
    from preresnet.training import load_checkpoint, model_from_checkpoint, resolve_runtime

    if args.weights:
        entry = get_weights(args.weights)
        model = build_model(*entry.architecture, weights=entry)
        facts, epoch = entry.meta, entry.meta["epochs"]
        dataset_name, data_dir = entry.meta["data"]["dataset"], entry.meta["data"]["data_dir"]
        source = {"weights": entry.name, "recorded_test_error": entry.test_error}
    else:
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, args.checkpoint)
        facts, epoch = checkpoint["config"], checkpoint["epoch"]
        dataset_name, data_dir = facts["dataset"], facts["data_dir"]
        source = {"checkpoint": str(args.checkpoint)}
    runtime = resolve_runtime(args.device, args.amp, channels_last=False, compile=False, loader=args.loader)
    dataset_name = args.dataset or dataset_name
    data_dir = str(Path(args.data_dir or data_dir).resolve())
    results, dataset = evaluate_test_split(model, dataset_name, data_dir, facts["mean"], facts["std"], runtime,
                                           args.batch_size)
    report = {**source, "model": model.paper_name, "epoch": epoch, "dataset": dataset_name, "data_dir": data_dir,
              **results, "classes": dataset.classes}
    if args.json:
        print(json.dumps(report))
        return report
    data = data_label(dataset_name, data_dir)
    print(f"{model.paper_name} after {epoch} epochs, {results['test_images']} test images of {data}")
    print(f"test error {100 * results['test_error']:.2f}%   test loss {results['test_loss']:.4f}")
    if args.weights:
        measured = entry.meta["measured"]
        print(f"recorded in {entry.name}: test error {100 * entry.test_error:.2f}% on {entry.meta['test_images']} "
              f"test images ({measured['precision']} on {measured['device']})")
    print("per-class accuracy:")
    width = max(len(name) for name in dataset.classes)
    for name, accuracy in zip(dataset.classes, results["per_class_accuracy"]):
        shown = "   n/a" if accuracy is None else f"{100 * accuracy:6.2f}%"
        print(f"  {name:<{width}}  {shown}")
    return report


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(main, args, "eval.py")


if __name__ == "__main__":
    sys.exit(cli())
