"""Train a pre-activation ResNet or Wide ResNet on CIFAR with the papers' recipes.

    python train.py --model preresnet110                     # PreResNet-110, He et al. recipe
    python train.py --model wrn16_4                          # WRN-16-4, Zagoruyko recipe
    python train.py --type normal --depth 18                 # the same PreResNet-110: 18 units per stage
    python train.py --model preresnet110 --seeds 0,1,2       # three seeds in one command, packed
    python train.py --model preresnet20 --init DEFAULT --dataset folder --data-dir DIR   # fine-tune (recipe finetune)
    python train.py --resume runs/preresnet-110-cifar10-...  # continue a stopped run exactly
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from . import distributed, faults
from .cli import OneLineParser, run_main
from .distributed import broadcast_object
from .errors import UserError
from .provenance import Command
from .loaders import CROP_PADDINGS
from .recipes import RECIPES
from .registry import MODEL_TYPES, list_models, paper_name
from .run_setup import network, default_out, train_one
from .runfiles import CHECKPOINT_NAME
from .runtime import CPU_COMPILE_MIN_STEPS, resolve_runtime, saved_runtime, warn_if_emulated
from .sweeps import GridRun, command_grid, parse_seeds, run_flags, train_packed
from .training import NonFiniteLoss

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
                            "network must be the weights'; the classifier head (fc) keeps the weights' rows of the "
                            "data's classes, matched by name, and is re-initialised when the weights do not classify "
                            "every class of the data; the data is normalised with the weights' mean and std; the "
                            "recipe is finetune unless --recipe names another. Recorded in config.json; not with "
                            "--resume PATH")
    model.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                       help="run BN-ReLU-conv and the residual add in the Triton kernels of kernels/ (default off; on a "
                            "GPU on only where a committed GPU report measured them correct and faster there, "
                            "preresnet/gpu_defaults.json; same weights and checkpoints either way; on a CPU only with "
                            "TRITON_INTERPRET=1)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"),
                      help="cifar10 / cifar100 (official archives, downloaded into --data-dir when missing) or "
                           "folder (DATA_DIR/train/<class>/* and DATA_DIR/test/<class>/*, read as torchvision's "
                           "ImageFolder reads them: image files only, converted to RGB; another size than 32x32 is "
                           "resized and centre-cropped as the weights' transforms() do); default cifar10")
    data.add_argument("--data-dir", help="where the dataset lives (default ./data); with --resume, a folder the run's "
                                         "data moved to (checked to hold the same data)")
    data.add_argument("--loader", choices=("auto", "dali", "torch"),
                      help="augmentation pipeline: NVIDIA DALI or tensor ops in torch; both give the same batches. "
                           "Default auto: the torch loader (on the CPU DALI was measured no faster; on a GPU DALI's "
                           "pipeline has not yet run: --loader dali takes it); config.json records why")

    recipe = parser.add_argument_group("recipe (every field overrides the chosen preset)")
    recipe.add_argument("--recipe", choices=tuple(RECIPES),
                        help="paper: He et al. 2016 (default for normal/bottleneck); wrn: Zagoruyko & Komodakis 2016 "
                             "(default for wide); finetune: lr 0.01, no warm-up, 15 epochs, lr /10 after 10 (default "
                             "with --init)")
    recipe.add_argument("--epochs", type=int, help="training epochs (paper 164, wrn 200, finetune 15); the lr milestones "
                                                   "and the warm-up scale with it unless --milestones / --warmup-iters "
                                                   "are given (the run's first lines print the lr schedule); with "
                                                   "--resume, more or fewer epochs than the run's, checked as a new "
                                                   "run's schedule is")
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
                             "81,122: epochs 82 and 123 train at the lower rates; wrn 59,119,159: the lr falls at the start of "
                             "epochs 60, 120 and 160, as in Zagoruyko & Komodakis's code)")
    recipe.add_argument("--lr-decay", type=float, help="lr multiplier at each milestone (paper 0.1, wrn 0.2)")
    recipe.add_argument("--warmup-iters", type=int,
                        help="optimizer steps at --warmup-lr before the lr (paper 400 of 164 epochs, wrn 0); one that "
                             "lasts the whole run is refused")
    recipe.add_argument("--warmup-lr", type=float, help="lr of the warm-up steps (paper 0.01)")
    recipe.add_argument("--crop-padding", choices=CROP_PADDINGS,
                        help="how the random crop's 4-pixel border is filled: zeros (the mean colour; paper, as in "
                             "fb.resnet.torch) or reflect (the image mirrored at its edges; wrn, as in Zagoruyko & "
                             "Komodakis's code)")

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
                          "on a GPU bf16 where it has it, else fp16 with loss scaling; on a CPU bf16 where it "
                          "computes bf16 natively (AVX512-BF16, AMX-BF16, Arm BF16; it matched fp32's accuracy, "
                          "docs/training.md), else fp32; bf16 or fp16 on a CPU that lacks them "
                          "natively works but warns that it is slow; a resumed run keeps its own; config.json says why")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels-last memory format (default on: faster on GPUs and in oneDNN's CPU convolutions)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help=f"torch.compile the model; default on a GPU; on a CPU on when the run's schedule has at "
                          f"least {CPU_COMPILE_MIN_STEPS:,} steps, where its warm-up repays; a resumed run keeps its own")
    run.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="capture the whole training step (forward, loss, backward, SGD) and the evaluation forward "
                          "in CUDA graphs and replay them (default off; on a GPU on only where a committed GPU report "
                          "measured it correct and faster there, preresnet/gpu_defaults.json; fp16 loss scaling and "
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


def main(args: argparse.Namespace, command: Command | None = None) -> dict:
    """Train what args say. command: the command that trains (its start: --time-limit counts from
    it); default, one starting now."""
    command = Command.starting() if command is None else command
    device = resolve_runtime(args.device or "auto", "off").device.type
    try:
        dist = distributed.init(device)
        if dist.enabled:
            # DDP broadcasts BatchNorm buffers before each forward, which Dynamo cannot trace: one graph
            # break there, announced once per rank under --compile (pytorch/pytorch#141827); the model
            # itself compiles. The command, not the library, decides what its output leaves out.
            warnings.filterwarnings("ignore", message=".*_broadcast_coalesced")
        # train.py's own process handles the signals from its first line; main called from Python here, or
        # by the preresnet-train command, installs the handlers for the run
        handlers = contextlib.nullcontext() if faults.installed() else \
            faults.stop_on_signals(repeat_interrupts=not dist.enabled)
        with handlers:
            result = train(args, dist, command)
        # the ranks leave together: rank 0 still writes the last checkpoint when the others are done, and a
        # rank that tears its gloo connections down under a peer that still holds them open can abort at exit
        # (seen once in CI: SIGABRT, "terminate called without an active exception", in a run that trained
        # well); not on the way out of an error, where the other ranks may never get here
        distributed.barrier()
        return result
    finally:
        distributed.shutdown()


def train(args: argparse.Namespace, dist, command: Command) -> dict:
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.resume == "auto" and args.out is None:
        raise UserError("--resume auto continues or starts the run in --out: give --out")
    deadline = None if args.time_limit is None else command.clock + args.time_limit
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
        return train_one(args, runtime, resume, deadline, command)
    if dist.enabled:
        raise UserError(f"--seeds and lists train their {len(runs)} run(s) packed in one process, which cannot run "
                        f"under torchrun: train them one by one (--seed), or without torchrun")
    folder = resumed or args.out
    if folder and (Path(folder) / CHECKPOINT_NAME).is_file():
        raise UserError(f"{folder} holds a single run, not the runs of --seeds or lists: resume it without them")
    if folder is None:
        folder = broadcast_object(default_out(paper_name(*network(args)), args.dataset or "cifar10"))
    return train_packed(args, runtime, runs, Path(folder), deadline, command)


def cli(argv: list[str] | None = None, prog: str = "preresnet-train", started: float | None = None) -> int:
    """The command (preresnet-train; train.py in a checkout calls it with prog="train.py" and the
    time.monotonic() of its first line as started)."""
    command = Command.starting(started, sys.argv if argv is None else [prog, *argv])
    args = build_parser(prog).parse_args(argv)
    try:
        return run_main(lambda parsed: main(parsed, command), args, prog)
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
