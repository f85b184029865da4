"""Train a pre-activation ResNet or Wide ResNet on CIFAR with the papers' recipes.

    python train.py --model preresnet110                     # PreResNet-110, He et al. recipe
    python train.py --model wrn16_4                          # WRN-16-4, Zagoruyko recipe
    python train.py --type normal --depth 18                 # the same PreResNet-110: 18 units per stage
    python train.py --model preresnet110 --seeds 0,1,2       # three seeds in one command, packed
    python train.py --model preresnet20 --init DEFAULT --dataset folder --data-dir DIR   # fine-tune
    python train.py --resume runs/preresnet-110-cifar10-...  # continue a stopped run exactly
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import distributed, faults
from .cli import OneLineParser, run_main
from .data import load_dataset
from .distributed import broadcast_object
from .errors import UserError
from .finetune import describe_init, resolve_init
from .models import (MODEL_TYPES, build_model, check_depth_meant, check_model_args, list_models, model_arch,
                     paper_name)
from .provenance import COMMAND_START  # --time-limit counts from here
from .recipes import (DEFAULT_RECIPE, RECIPES, Recipe, check_recipe, check_schedule, describe_schedule,
                      resolve_recipe, steps_per_epoch)
from .runtime import CPU_COMPILE_MIN_STEPS, resolve_runtime, saved_runtime, settle_compile, warn_if_emulated
from .sweeps import DIVERGED_NAME, SUMMARY_NAME, GridRun, grid, parse_seeds, saved_grid, summary_table, write_summary
from .training import (CHECKPOINT_NAME, NonFiniteLoss, RunSpec, atomic_write, checkpoint_path, load_checkpoint,
                       prepare_config, schedule_steps, train_runs)

# Flags that may differ when resuming: they change how the run executes, not what it computes.
RESUME_MAY_CHANGE = {"epochs", "device", "amp", "channels_last", "compile", "loader", "fused", "sync_bn", "progress",
                     "resume", "cuda_graphs", "time_limit"}


def parse_milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 81,122, got {text!r}") from None


def parse_values(text: str) -> list[float]:
    """A number, or comma-separated numbers (one run each)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct numbers, got {text!r}")
    return values


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=list_models(), metavar="NAME",
                       help=f"the network by its registry name: {', '.join(list_models())} (or --type, --depth "
                            f"and --width)")
    model.add_argument("--type", choices=MODEL_TYPES,
                       help="normal: basic units, 6n+2 layers; bottleneck: 1x1-3x3-1x1 units, 9n+2 layers; "
                            "wide: basic units of width 16k/32k/64k, 6n+4 layers")
    model.add_argument("--depth", type=int, help="residual units per stage, n (18 gives PreResNet-110 or -164); the "
                                                 "total depth of a papers' network (20, 56, 110, 164, 1001, 16, 28, "
                                                 "...) is refused, naming the --model meant")
    model.add_argument("--units", type=int, metavar="N",
                       help="residual units per stage, as --depth but taken as given: --units 110 builds PreResNet-662 "
                            "on purpose")
    model.add_argument("--width", type=int, help="widening factor k of wide networks (default 1)")
    model.add_argument("--dropout", type=float, help="dropout between the convs of wide units (WRN uses 0.3; default 0)")
    model.add_argument("--init", metavar="NAME|PATH",
                       help="start a new run (new optimizer and lr schedule, from epoch 0) from weights: a registry "
                            "entry (python -m preresnet.pretrained lists them), DEFAULT (the best entry of the "
                            "network), a state_dict file, or a train.py run folder or checkpoint (its model). The "
                            "network must be the weights'; the classifier head (fc) is re-initialised when the data "
                            "has another number of classes. Recorded in config.json; not with --resume PATH")
    model.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                       help="run BN-ReLU-conv and the residual add in the Triton kernels of kernels/ (default off; "
                            "same weights and checkpoints either way; on a CPU only with TRITON_INTERPRET=1)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"),
                      help="cifar10 / cifar100 (official archives, downloaded into --data-dir when missing) or "
                           "folder (DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*, 32x32 RGB); default cifar10")
    data.add_argument("--data-dir", help="where the dataset lives (default ./data)")
    data.add_argument("--loader", choices=("auto", "dali", "torch"),
                      help="augmentation pipeline: NVIDIA DALI or tensor ops in torch; both give the same batches. "
                           "Default auto: torch on the CPU; on a GPU, DALI where it is installed and measured not "
                           "slower on that GPU (preresnet/loader_choice.json), else torch; config.json records why")

    recipe = parser.add_argument_group("recipe (every field overrides the chosen preset)")
    recipe.add_argument("--recipe", choices=tuple(RECIPES),
                        help="paper: He et al. 2016 (default for normal/bottleneck); wrn: Zagoruyko & Komodakis 2016 "
                             "(default for wide)")
    recipe.add_argument("--epochs", type=int, help="training epochs (paper 164, wrn 200); the lr milestones and the "
                                                   "warm-up scale with it unless --milestones / --warmup-iters are "
                                                   "given (the run's first lines print the lr schedule)")
    recipe.add_argument("--batch-size", type=int, help="images per optimizer step (128)")
    recipe.add_argument("--lr", type=parse_values, help="learning rate after warm-up (0.1); a comma-separated "
                                                        "list trains one run per value (see --seeds)")
    recipe.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    recipe.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                        help="Nesterov momentum (paper off, wrn on)")
    recipe.add_argument("--weight-decay", type=parse_values, help="L2 weight decay (paper 1e-4, wrn 5e-4); a "
                                                                  "comma-separated list trains one run per value")
    recipe.add_argument("--milestones", type=parse_milestones,
                        help="comma-separated numbers of epochs after which the lr is multiplied by --lr-decay (paper "
                             "81,122: epochs 82 and 123 train at the lower rates; wrn 60,120,160)")
    recipe.add_argument("--lr-decay", type=float, help="lr multiplier at each milestone (paper 0.1, wrn 0.2)")
    recipe.add_argument("--warmup-iters", type=int,
                        help="optimizer steps at --warmup-lr before the lr (paper 400 of 164 epochs, wrn 0); one that "
                             "lasts the whole run is refused")
    recipe.add_argument("--warmup-lr", type=float, help="lr of the warm-up steps (paper 0.01)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", help="run folder (default runs/<model>-<dataset>-<time>)")
    run.add_argument("--resume", metavar="PATH", help="continue the run in this folder (or from this checkpoint file); "
                                                      "auto: continue the run in --out if it holds a checkpoint, else start "
                                                      "it (one command line for torchrun --max-restarts and requeued jobs)")
    run.add_argument("--seed", type=int, help="seed for initialisation, data order and augmentation (default 0)")
    run.add_argument("--seeds", type=parse_seeds, metavar="LIST",
                     help="several runs in one command, one per seed (0,1,2): each in its own run folder OUT/seed-N, "
                          "with OUT/summary.json and a table of each final test error and their mean, std, median, "
                          "min and max. With lists for --lr and --weight-decay the runs are every seed x lr x weight "
                          "decay (folders like OUT/lr-0.05-wd-0.0005-seed-0); network, recipe and data are shared. On "
                          "a GPU the runs are packed: each step of every run is queued on its own CUDA stream, so the "
                          "GPU overlaps them; on a CPU they step in turn. Not under torchrun")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                     help="autocast precision (BatchNorm statistics, loss, optimizer and checkpoint stay fp32); auto: "
                          "on a GPU bf16 where it has it, else fp16 with loss scaling; on a CPU fp32 for now (bf16 "
                          "awaits its accuracy comparison; docs/training.md); bf16 or fp16 on a CPU that lacks them "
                          "natively works but warns that it is slow; a resumed run keeps its own; config.json says why")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels-last memory format (default on: faster on GPUs and in oneDNN's CPU convolutions)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help=f"torch.compile the model; default on a GPU; on a CPU on when the run's schedule has at "
                          f"least {CPU_COMPILE_MIN_STEPS:,} steps, where its warm-up repays; a resumed run keeps its own")
    run.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="capture the whole training step (forward, loss, backward, SGD) and the evaluation forward "
                          "in CUDA graphs and replay them (default on for GPU, off for CPU; fp16 loss scaling and "
                          "multi-process runs fall back to the plain step, with the reason printed)")
    run.add_argument("--time-limit", type=float, metavar="SECONDS",
                     help="stop cleanly at the end of an epoch (checkpoint written) when the next epoch would end "
                          "more than this many seconds after the start of this command (the first epoch always "
                          "runs); continue with --resume")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                     help="under torchrun: BatchNorm statistics over the batch of all processes (default off: "
                          "per-process statistics, as the paper's 2-GPU runs)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    return parser


RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "lr_decay",
                "warmup_iters", "warmup_lr", "dropout")


def new_run(args: argparse.Namespace, out: Path | None = None, dataset=None):
    """Config, recipe, output folder and dataset of a fresh run, from the flags (out: the folder a
    packed command gives it; dataset: the data already loaded for another run of the command)."""

    type, depth, width = network(args)
    dropout = 0.0 if args.dropout is None else args.dropout
    check_model_args(type, depth, width, dropout=dropout)
    recipe_name = args.recipe or DEFAULT_RECIPE[type]
    recipe = resolve_recipe(recipe_name, **{name: getattr(args, name) for name in RECIPE_FLAGS})
    seed = 0 if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    dataset_name = args.dataset or "cifar10"
    data_dir = str(Path(args.data_dir or "data").resolve())
    name = paper_name(type, depth, width)
    if out is None:  # under torchrun every process must agree on the folder: rank 0's clock names it
        out = Path(broadcast_object(args.out or default_out(name, dataset_name)))
    if (out / CHECKPOINT_NAME).exists():
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    dataset = dataset or load_dataset(dataset_name, data_dir)
    check_schedule(recipe, steps_per_epoch(len(dataset.train.labels), recipe.batch_size))
    init = {} if args.init is None else {"init": resolve_init(args.init, type, depth, width, dataset.num_classes)}
    config = prepare_config(
        dataset, model=name, type=type, depth=depth, width=width, dropout=recipe.dropout,
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
        check_depth_meant(args.type, depth, width)
    return args.type, depth, width


def default_out(name: str, dataset_name: str) -> str:
    return f"runs/{name.lower()}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resumed_run(args: argparse.Namespace, resume: str):
    """Config, recipe and folder of the run being resumed (resume: a folder or checkpoint file);
    only execution flags may change."""

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
        # --out: the folder resumed, under auto; --model: checked above (the config names the network by its paper name)
        if value is None or flag in RESUME_MAY_CHANGE or flag in ("out", "model"):
            continue
        saved_value = saved.get(flag)
        if flag == "data_dir":
            value = str(Path(value).resolve())
        if isinstance(saved_value, (list, tuple)):
            saved_value = tuple(saved_value)
        if value != saved_value:
            raise UserError(f"--resume continues the saved configuration: --{flag.replace('_', '-')} was "
                            f"{saved_value!r}, not {value!r} (only --epochs and execution flags may change)")
    if args.epochs is not None:
        recipe = replace(recipe, epochs=args.epochs)
        check_recipe(recipe)
    out = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    return config, recipe, out, checkpoint


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


def main(args: argparse.Namespace) -> dict:
    device = resolve_runtime(args.device or "auto", "off").device.type
    try:
        dist = distributed.init(device)
        # train.py's own process handles the signals from its first line; main called from Python here, or
        # by the preresnet-train command, installs the handlers for the run
        handlers = contextlib.nullcontext() if faults.installed() else \
            faults.stop_on_signals(repeat_interrupts=not dist.enabled)
        with handlers:
            return train(args, dist)
    finally:
        distributed.shutdown()


def train(args: argparse.Namespace, dist) -> dict:
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.resume == "auto" and args.out is None:
        raise UserError("--resume auto continues or starts the run in --out: give --out")
    deadline = None if args.time_limit is None else COMMAND_START + args.time_limit
    resumed = args.out if args.resume == "auto" else args.resume  # the folder continued, if any
    # a resumed run's auto keeps the precision, layout and compilation it was started with
    runtime = resolve_runtime(args.device or "auto", args.amp or "auto", args.channels_last, args.compile,
                              args.loader or "auto", args.fused, args.sync_bn, dist, cuda_graphs=args.cuda_graphs,
                              saved=saved_runtime(resumed) if resumed else None)
    if dist.is_main:
        warn_if_emulated(runtime, say=lambda line: print(line, file=sys.stderr))
    runs = command_grid(args, resumed)
    if runs is None:
        args = run_flags(args, GridRun("", args.seed, *(values[0] if values else None
                                                          for values in (args.lr, args.weight_decay))))
        resume = args.resume
        if resume == "auto":  # the same command line starts the run and continues it after a restart
            # every process must take the same branch: rank 0 looks
            resume = args.out if broadcast_object((Path(args.out) / CHECKPOINT_NAME).is_file()) else None
        return train_one(args, runtime, resume, deadline)
    if dist.enabled:
        raise UserError(f"--seeds and lists train their {len(runs)} run(s) packed in one process, which cannot run "
                        f"under torchrun: train them one by one (--seed), or without torchrun")
    folder = resumed or args.out
    if folder and (Path(folder) / CHECKPOINT_NAME).is_file():
        raise UserError(f"{folder} holds a single run, not the runs of --seeds or lists: resume it without them")
    if folder is None:
        folder = broadcast_object(default_out(paper_name(*network(args)), args.dataset or "cifar10"))
    return train_packed(args, runtime, runs, Path(folder), deadline)


def train_one(args: argparse.Namespace, runtime, resume: str | None, deadline: float | None) -> dict:
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
    [run] = train_runs([spec], runtime, dataset, progress=args.progress, deadline=deadline)
    faults.finished()  # every epoch is saved: a signal from now on changes nothing
    final = run.history[-1] if run.history else {}
    if final and dist.is_main and run.status == "paused":
        print(f"stopped after epoch {final['epoch']} of {recipe.epochs} (--time-limit), test error "
              f"{100 * final['test_error']:.2f}%; continue with: python train.py --resume {out}")
    elif final and dist.is_main:
        print(f"final test error {100 * final['test_error']:.2f}% after {final['epoch']} epochs ({out})")
    return final


def train_packed(args: argparse.Namespace, runtime, runs: list[GridRun], folder: Path, deadline: float | None) -> dict:
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


def check_network(config: dict, runtime) -> None:
    """Build the run's network on the meta device (no memory, no time), so that what TrainingRun
    would refuse (the fused kernels with dropout, or without Triton) is refused before the run's
    folder and first lines are written."""

    with torch.device("meta"):
        build_model(config["type"], config["depth"], config["width"], num_classes=config["num_classes"],
                    fused=runtime.fused, dropout=config["dropout"])


def say_start(specs: list, dataset) -> None:
    """Before the first step, on stderr: each run's lr schedule and, for a run that starts from
    weights (--init), where they come from; one line for the runs of a packed command that share it."""

    lines: dict[str, list[str]] = {}
    for spec in specs:
        schedule = describe_schedule(spec.recipe, steps_per_epoch(len(dataset.train.labels), spec.recipe.batch_size))
        lines.setdefault(f"lr schedule: {schedule}", []).append(spec.out.name)
        if spec.checkpoint is None and spec.config.get("init"):  # a resumed run's checkpoint holds its model
            lines.setdefault(describe_init(spec.config["init"], spec.config["num_classes"]), []).append(spec.out.name)
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
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))  # a failed write leaves the old one


def cli(argv: list[str] | None = None, prog: str = "preresnet-train") -> int:
    """The command (preresnet-train; train.py in a checkout calls it with prog="train.py")."""
    args = build_parser(prog).parse_args(argv)
    try:
        return run_main(main, args, prog)
    except NonFiniteLoss as exc:
        print(f"{prog}: stopped: {exc}; the last checkpoint was left as it was "
              f"(try a lower --lr, or --amp off)", file=sys.stderr)
        return 1
    except faults.Interrupted as exc:  # a stop signal: the positions are saved; the shell's status for that signal
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the run
            print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue with --resume and the run folder", file=sys.stderr)
        return 130
    finally:
        faults.finished()  # a signal from now on changes nothing: the command ends with the status above


if __name__ == "__main__":
    sys.exit(cli())
