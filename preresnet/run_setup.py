"""One run of train.py, from its flags to its folder: the config, recipe and folder of a new
run or of the run resumed (only execution flags may change), checks before anything is written,
config.json, and the command that trains it alone (train_one). preresnet/sweeps.py trains several.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import faults
from .data import Dataset, channel_mean_std, data_label, data_sha256, load_dataset
from .distributed import broadcast_object
from .errors import UserError
from .finetune import describe_init, resolve_init
from .models import build_model
from .recipes import (DEFAULT_RECIPE, FINETUNE_RECIPE, Recipe, check_schedule, describe_schedule, resolve_recipe,
                      resumed_recipe, steps_per_epoch)
from .registry import check_depth_meant, check_model_args, model_arch, paper_name
from .runfiles import CHECKPOINT_NAME, CONFIG_NAME, checkpoint_path, load_checkpoint, write_text
from .runtime import settle_compile
from .training import RunSpec, train_runs

# Flags that may differ when resuming: they change how the run executes, not what it computes.
RESUME_MAY_CHANGE = {"epochs", "device", "amp", "channels_last", "compile", "loader", "fused", "sync_bn", "progress",
                     "resume", "cuda_graphs", "time_limit"}


RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "lr_decay",
                "warmup_iters", "warmup_lr", "dropout", "crop_padding")


def new_run(args: argparse.Namespace, out: Path | None = None, dataset=None):
    """Config, recipe, output folder and dataset of a fresh run, from the flags (out: the folder a
    packed command gives it; dataset: the data already loaded for another run of the command)."""

    model_type, depth, width = network(args)
    dropout = 0.0 if args.dropout is None else args.dropout
    check_model_args(model_type, depth, width, dropout=dropout)
    # a run from weights fine-tunes them unless a recipe is named: the from-scratch lr would undo them
    recipe_name = args.recipe or (FINETUNE_RECIPE if args.init is not None else DEFAULT_RECIPE[model_type])
    recipe = resolve_recipe(recipe_name, **{name: getattr(args, name) for name in RECIPE_FLAGS})
    seed = 0 if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    dataset_name = args.dataset or "cifar10"
    data_dir = str(Path(args.data_dir or "data").resolve())
    name = paper_name(model_type, depth, width)
    if out is None:  # under torchrun every process must agree on the folder: rank 0's clock names it
        out = Path(broadcast_object(args.out or default_out(name, dataset_name)))
    if (out / CHECKPOINT_NAME).exists():
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    dataset = dataset or load_dataset(dataset_name, data_dir)
    check_schedule(recipe, steps_per_epoch(len(dataset.train.labels), recipe.batch_size))
    init = {} if args.init is None else {"init": resolve_init(args.init, model_type, depth, width, dataset.classes)}
    config = prepare_config(
        dataset, model=name, type=model_type, depth=depth, width=width, dropout=recipe.dropout,
        dataset=dataset_name, data_dir=data_dir, recipe_name=recipe_name, seed=seed, **init,
    )
    return config, recipe, out, dataset


def network(args: argparse.Namespace) -> tuple[str, int, int]:
    """(type, units per stage, width) of the network the flags choose: --model NAME, or --type with
    --depth (refused where it is a papers' total depth) or --units (taken as given), and --width."""
    if args.depth is not None and args.units is not None:
        raise UserError("--depth and --units both give the residual units per stage: give one")
    depth_flag, depth = ("--units", args.units) if args.units is not None else ("--depth", args.depth)
    if args.model is not None:
        arch = model_arch(args.model)
        given = zip(("--type", depth_flag, "--width"), (args.type, depth, args.width), arch, strict=True)
        for flag, value, expected in given:
            if value is not None and value != expected:
                raise UserError(f"--model {args.model} is {paper_name(*arch)} ({flag} {expected}), not {flag} {value}: "
                                f"give --model alone, or --type, --depth and --width without it")
        return arch
    if args.type is None or depth is None:
        raise UserError("--type and --depth are required, or --model NAME (or --resume a run)")
    width = 1 if args.width is None else args.width
    check_model_args(args.type, depth, width)
    if args.units is None:
        check_depth_meant(args.type, depth, width, command_line=True)
    return args.type, depth, width


def default_out(name: str, dataset_name: str) -> str:
    return f"runs/{name.lower()}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resumed_run(args: argparse.Namespace, resume: str):
    """Config, recipe and folder of the run being resumed (resume: a folder or checkpoint file);
    only execution flags, --epochs (checked as a new run's schedule is) and --data-dir (to the same
    data, moved) may change."""

    checkpoint = load_checkpoint(resume)
    config, recipe = checkpoint["config"], Recipe(**{**checkpoint["recipe"], "milestones": tuple(checkpoint["recipe"]["milestones"])})
    # --units is --depth taken as given; --init names the weights the run started from (the same
    # command line with --resume auto names them again; the checkpoint holds the model)
    saved = {**config, "recipe": config["recipe_name"], **asdict(recipe), "units": config["depth"],
             "init": (config.get("init") or {}).get("source")}
    if args.out is not None and args.resume != "auto":
        raise UserError("--resume continues the run in its own folder: drop --out")
    if args.init is not None and args.resume not in (None, "auto"):
        raise UserError("--init starts a new run from weights and --resume continues a run (its checkpoint holds the "
                        "model): drop --init, or start a new run with --init and another --out")
    if args.model is not None and model_arch(args.model) != (config["type"], config["depth"], config["width"]):
        raise UserError(f"--resume continues the saved configuration: the run trains {config['model']}, not --model "
                        f"{args.model} ({paper_name(*model_arch(args.model))})")
    for flag, value in vars(args).items():
        # --out: the folder resumed, under auto; --model: checked above (the config names the network by its
        # paper name); --data-dir: checked below (the same data may have moved)
        if value is None or flag in RESUME_MAY_CHANGE or flag in ("out", "model", "data_dir"):
            continue
        saved_value = saved.get(flag)
        if isinstance(saved_value, (list, tuple)):
            saved_value = tuple(saved_value)
        if value != saved_value:
            raise UserError(f"--resume continues the saved configuration: --{flag.replace('_', '-')} was "
                            f"{saved_value!r}, not {value!r} (only --epochs, --data-dir to the same data and "
                            f"execution flags may change)")
    if args.data_dir is not None and str(Path(args.data_dir).resolve()) != config["data_dir"]:
        config = moved_data(config, str(Path(args.data_dir).resolve()))
    if args.epochs is not None:
        recipe = resumed_recipe(recipe, args.epochs, checkpoint["epoch"], checkpoint_steps_per_epoch(checkpoint))
    out = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    return config, recipe, out, checkpoint


def checkpoint_steps_per_epoch(checkpoint: dict) -> int | None:
    """The optimizer steps of the resumed run's epochs, from its checkpoint's count (None before its first epoch ends)."""
    in_epoch = (checkpoint.get("position") or {}).get("step", 0)
    return (checkpoint["iteration"] - in_epoch) // checkpoint["epoch"] if checkpoint["epoch"] else None


def moved_data(config: dict, data_dir: str) -> dict:
    """The config of a run resumed with --data-dir naming another folder than the one it trained on:
    allowed when the folder holds the same data (data_sha256, or for a run set up before it was
    recorded its classes and the training images' per-channel mean and std), the config then naming
    the new folder; refused with one line otherwise."""
    dataset = load_dataset(config["dataset"], data_dir)
    old = config["data_dir"]
    if "data_sha256" in config:
        same, what = data_sha256(dataset) == config["data_sha256"], "the sha256 of its classes, labels and images"
    else:
        same = dataset.classes == config["classes"] and \
            channel_mean_std(dataset.train.images) == (config["mean"], config["std"])
        what = "its classes and the per-channel mean and std of its training images (the run predates data hashes)"
    if not same:
        raise UserError(f"--resume continues the saved configuration: --data-dir {data_dir} does not hold the data the "
                        f"run trained on in {old} ({what} differ): give the folder of that data")
    print(f"note: the run's data moved from {old} to {data_dir} (the same data: {what}); continuing with "
          f"{data_label(config['dataset'], data_dir)} there", file=sys.stderr)
    return {**config, "data_dir": data_dir}


def train_one(args: argparse.Namespace, runtime, resume: str | None, deadline: float | None, command=None) -> dict:
    dist = runtime.dist
    if resume:
        config, recipe, out, checkpoint = resumed_run(args, resume)
        dataset = load_dataset(config["dataset"], config["data_dir"])
    else:
        config, recipe, out, dataset = new_run(args)
        checkpoint = None
    check_network(config, runtime)
    runtime = settle_compile(runtime, schedule_steps([recipe], dataset))
    if dist.is_main:
        make_folder(out)
        write_config(out, config, recipe, runtime)
    # resumed from another file than the folder's checkpoint (its predecessor, when it was unreadable):
    # that checkpoint is not kept as checkpoint-prev.pt
    keep_previous = not resume or checkpoint_path(resume).resolve() == (out / CHECKPOINT_NAME).resolve()
    spec = RunSpec(config, recipe, out, checkpoint, keep_previous)
    if dist.is_main:
        say_start([spec], dataset)
    [run] = train_runs([spec], runtime, dataset, progress=args.progress, deadline=deadline, command=command)
    faults.finished()  # every epoch is saved: a signal from now on changes nothing
    final = run.history[-1] if run.history else {}
    if final and dist.is_main and run.status == "paused":
        print(f"stopped after epoch {final['epoch']} of {recipe.epochs} (--time-limit), test error "
              f"{100 * final['test_error']:.2f}%; continue with: python train.py --resume {out}")
    elif final and dist.is_main:
        print(f"final test error {100 * final['test_error']:.2f}% after {final['epoch']} epochs ({out})")
    return final


def check_network(config: dict, runtime) -> None:
    """Build the run's network on the meta device (no memory, no time), so that what TrainingRun
    would refuse (the fused kernels with dropout, or without Triton) is refused before the run's
    folder and first lines are written."""

    with torch.device("meta"):
        build_model(config["type"], units=config["depth"], width=config["width"], num_classes=config["num_classes"],
                    fused=runtime.fused, dropout=config["dropout"])


def say_start(specs: list, dataset) -> None:
    """Before the first step, on stderr: each run's lr schedule and, for a run that starts from
    weights (--init), where they come from; one line for the runs of a packed command that share it."""

    lines: dict[str, list[str]] = {}
    for spec in specs:
        schedule = describe_schedule(spec.recipe, steps_per_epoch(len(dataset.train.labels), spec.recipe.batch_size))
        lines.setdefault(f"lr schedule: {schedule}", []).append(spec.out.name)
        if spec.checkpoint is None and spec.config.get("init"):  # a resumed run's checkpoint holds its model
            lines.setdefault(describe_init(spec.config["init"], spec.config["classes"]), []).append(spec.out.name)
    for line, names in lines.items():
        print(line if len(specs) == 1 or len(names) == len(specs) else f"{', '.join(names)}: {line}", file=sys.stderr)


def make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run folder {out}: {exc.strerror}") from None


def write_config(out: Path, config: dict, recipe: Recipe, runtime) -> None:
    text = json.dumps({**config, "recipe": asdict(recipe), "runtime": {
        "device": str(runtime.device), "amp": runtime.amp, "channels_last": runtime.channels_last,
        "compile": runtime.compile, "loader": runtime.loader, **runtime.reasons(),
        "fused": runtime.fused, "sync_bn": runtime.sync_bn,
        "cuda_graphs": runtime.cuda_graphs,
        "processes": runtime.dist.world_size}}, indent=2) + "\n"
    write_text(out / CONFIG_NAME, text)  # a failed write leaves the old one


def schedule_steps(recipes: list[Recipe], dataset: Dataset) -> int:
    """Optimizer steps of the longest of these runs' whole schedules (what a CPU's auto compile weighs)."""
    return max(recipe.epochs * steps_per_epoch(len(dataset.train.labels), recipe.batch_size) for recipe in recipes)


def prepare_config(data: Dataset, **fields) -> dict:
    """The run's config: what the user chose plus what follows from the data (classes, the sha256 of
    the data, and the normalisation: the training images' mean and std, or for a run from weights
    that record theirs (fields' init), the weights' own, as the network expects its input)."""
    init = fields.get("init") or {}
    mean, std = (init["mean"], init["std"]) if init.get("mean") else channel_mean_std(data.train.images)
    return {**fields, "num_classes": data.num_classes, "classes": data.classes, "mean": mean, "std": std,
            "data_sha256": data_sha256(data)}
