"""Evaluate a checkpoint written by train.py on its test set.

    python eval.py --checkpoint runs/preresnet-110-cifar10-.../checkpoint.pt
    python eval.py --checkpoint RUN_FOLDER --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from preresnet.cli import OneLineParser, run_main
from preresnet.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="checkpoint file, the run folder holding checkpoint.pt, or a finished run's exported "
                             "weights (bench/results/reproduce/*/weights-bf16.pt)")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"), help="default: the dataset the run trained on")
    parser.add_argument("--data-dir", help="default: the data folder the run trained on")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto: cuda when available")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="off",
                        help="autocast precision for evaluation (default off: fp32)")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                        help="data pipeline: NVIDIA DALI or tensor ops in torch (default auto: DALI when installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(args: argparse.Namespace) -> dict:
    from preresnet.data import load_dataset
    from preresnet.loaders import build_loader
    from preresnet.training import evaluate, load_checkpoint, model_from_checkpoint, resolve_runtime

    checkpoint = load_checkpoint(args.checkpoint, weights_ok=True)  # also a finished run's exported bf16 weights
    config = checkpoint["config"]
    model = model_from_checkpoint(checkpoint, args.checkpoint)
    runtime = resolve_runtime(args.device, args.amp, channels_last=False, compile=False, loader=args.loader)
    dataset_name = args.dataset or config["dataset"]
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else config["data_dir"]
    dataset = load_dataset(dataset_name, data_dir)
    if dataset.num_classes != config["num_classes"]:
        raise UserError(f"{dataset_name} in {data_dir} has {dataset.num_classes} classes; the checkpoint's "
                        f"{model.paper_name} was trained for {config['num_classes']}")
    loader = build_loader(dataset.test.images, dataset.test.labels, batch_size=args.batch_size, train=False,
                          backend=runtime.loader, mean=config["mean"], std=config["std"], device=runtime.device)
    results = evaluate(model.to(runtime.device), loader, runtime, config["num_classes"])
    report = {
        "checkpoint": str(args.checkpoint),
        "model": model.paper_name,
        "epoch": checkpoint["epoch"],
        "dataset": dataset_name,
        "data_dir": data_dir,
        **results,
        "classes": dataset.classes,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{model.paper_name} after {checkpoint['epoch']} epochs, {results['test_images']} test images of {dataset_name}")
        print(f"test error {100 * results['test_error']:.2f}%   test loss {results['test_loss']:.4f}")
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
