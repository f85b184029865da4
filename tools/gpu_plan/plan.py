"""The staged GPU plan: what a GPU session (one H100 or H200, 15 minutes of device time, commands of
at most 10 minutes) is asked, one stage per command, each ending by itself well inside 10 minutes.

    python -m tools.gpu_plan next                 # which stage (and model) the committed results call for
    python -m tools.gpu_plan first-contact        # kernel tests, launch configs, layer paths, speed matrix, packing
    python -m tools.gpu_plan reproduce [--model preresnet110]   # the paper's schedule, seeds packed, resumable
    python -m tools.gpu_plan dali                 # DALI's GPU pipeline against the torch loader (dali_stage.py)
    python -m tools.gpu_plan STAGE --dry-run --results DIR      # on the CPU: tiny network, stand-ins
    python -m tools.gpu_plan unpack FILES_AT      # here, after a command: its returned results into the checkout

The order (`next` applies it): `first-contact` until it has passed on the current kernels
(preresnet/kernels/*.py hashed into its report), then `reproduce` until PreResNet-110 is finished,
then PreResNet-164, then WRN-16-4. tools/gpu_plan/README.md has the exact device commands.

Every stage keeps a wall-clock budget (`--budget-seconds`, default 540 of the command's 600), starts
a part only while it fits, and writes its results after every part, so a stage cut short still
returns what it measured. Results go under `--results` (default `bench/results`), in the layout of
this repository. On the GPU machine, where `$OUT` is the folder that comes back, they go to a return
tree under `--work` instead, which returning.py bundles into a few files at the top of `$OUT`
after every save (a command brings back at most 8 files); `unpack` extracts them over the checkout.
State that only needs to live while the machine is warm (the extracted data, the run folders, the
torch.compile and Triton caches, so that a second command on the same machine compiles nothing
again) is kept under `--work` (default /tmp/preresnet-plan).

`--dry-run` runs a stage on the CPU with a tiny network, a synthetic dataset and one or two epochs;
each GPU-only part is replaced by a stand-in that prints `STAND-IN` and says what it replaces, so a
GPU session never finds a crash that the CPU could have shown (tools/gpu_plan/tests/ runs them).

The modules: this one (the order and the command line), first_contact.py and matrix.py (the first
stage and its speed matrix), reproduce.py, dali_stage.py, common.py (what they share), returning.py
(what a command brings back) and dali_transfer.py (DALI's wheel brought in parts, its own command).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from preresnet import sweeps
from tools.gpu_plan import returning
from tools.gpu_plan.common import (
    BUDGET_SECONDS,
    COMMITTED_RESULTS,
    DEFAULT_WORK,
    NETWORKS,
    ORDER,
    ROOT,
    default_results,
    kernels_digest,
)
from tools.gpu_plan.dali_stage import dali_stage, measured
from tools.gpu_plan.first_contact import first_contact
from tools.gpu_plan.matrix import matrix_child, packing_child
from tools.gpu_plan.reproduce import DATA_ARCHIVE, checkpoint_room, reproduce, run_name


def next_stage(results_dirs=(COMMITTED_RESULTS,)) -> tuple[str, str]:
    """(stage, why) by the documented order."""
    digest = kernels_digest()
    passed = False
    for results in results_dirs:
        for path in Path(results).glob("*/report.json"):
            data = json.loads(path.read_text())
            passed |= data.get("stage") == "first-contact" and bool(data.get("passed")) \
                and data.get("kernels_digest") == digest
    if not passed:
        return "first-contact", f"no first-contact report has passed on the current kernels ({digest})"
    # the loaders on the GPU: one window of their own once first-contact has passed
    due = "" if measured(results_dirs) else ("; due too, in a window of its own: the DALI transfer and the stage "
                                             "dali (tools/gpu_plan/README.md, 'DALI on the GPU')")
    for model in ORDER:
        runs = [Path(results) / "reproduce" / run_name(model, False) / "run.json" for results in results_dirs]
        summary = next((json.loads(p.read_text()) for p in runs if p.is_file()), {})
        if not summary.get("finished"):
            done = summary.get("epochs_done", 0)
            room = checkpoint_room(model, COMMITTED_RESULTS / "reproduce" / run_name(model, False))
            return f"reproduce --model {model}", (f"{model}: {max(done, 0)} of {summary.get('epochs') or 'all'} epochs "
                                                  f"done; {room} of its checkpoints can travel at a time{due}")
    return "none", f"every run of the plan is finished{due}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="on the CPU: tiny network, stand-ins for the GPU parts")
    common.add_argument("--results", default=None, help="results root (default bench/results; on the GPU machine the "
                                                         "return tree bundled into $OUT)")
    common.add_argument("--work", default=str(DEFAULT_WORK), help="machine-local state: data, run folders, caches")
    common.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS,
                        help="wall-clock budget of the whole command (default 540)")
    fc = sub.add_parser("first-contact", parents=[common], help="kernel tests, launch configs, layer paths, speed matrix")
    fc.add_argument("--batch-size", type=int, default=128)
    rp = sub.add_parser("reproduce", parents=[common], help="the paper schedule of one network, resumable")
    rp.add_argument("--model", choices=tuple(NETWORKS), default="preresnet110")
    rp.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the same stage on the CPU, fp32 (hours: give --budget-seconds accordingly)")
    rp.add_argument("--threads", type=int, default=1,
                    help="with --device cpu: CPU threads of the training process (default 1: a shared machine's "
                         "other work does not stall it)")
    rp.add_argument("--seeds", type=sweeps.parse_seeds, help="comma-separated seeds, one run each (default 0,1,2, or the "
                    "seeds the run was started with); may add seeds to a run, its finished seeds kept")
    rp.add_argument("--data-archive", default=str(DATA_ARCHIVE), help="the JPEG CIFAR-10 archive (carried)")
    rp.add_argument("--flags", help="train.py execution flags instead of first-contact's choice, with '=': "
                                    "--flags='--no-fused --compile --cuda-graphs'")
    rp.add_argument("--train-seconds", type=float, help="train.py --time-limit (default: the budget left minus the reserve)")
    rp.add_argument("--reserve-seconds", type=float, default=45.0,
                    help="kept after training for copying, export and evaluation (default 45)")
    sub.add_parser("next", help="the next stage by the documented order")
    unpack = sub.add_parser("unpack", help="here, after a device command: check the results it returned and "
                                           "extract them over the checkout (returning.py)")
    unpack.add_argument("source", help="the folder the returned files were copied to (the device's files_at)")
    unpack.add_argument("--into", default=str(ROOT), help="the checkout (default: this one)")
    sub.add_parser("dali", parents=[common], help="DALI's GPU pipeline against the torch loader (dali_stage.py)")
    packing = sub.add_parser("_packing", parents=[common])
    packing.add_argument("--model", required=True)
    packing.add_argument("--variant", required=True)
    packing.add_argument("--counts", required=True)
    packing.add_argument("--rows", required=True)
    packing.add_argument("--seconds", type=float, required=True)
    child = sub.add_parser("_matrix", parents=[common])
    child.add_argument("--model", required=True)
    child.add_argument("--variants", required=True)
    child.add_argument("--rows", required=True)
    child.add_argument("--seconds", type=float, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "unpack":
        written = returning.unpack(Path(args.source), Path(args.into))
        print(f"unpacked {len(written)} files from {args.source} into {args.into}")
        return 0
    if getattr(args, "results", None) is None and args.stage != "next":
        args.results = str(default_results(Path(args.work)) if args.stage in ("first-contact", "reproduce", "dali")
                           else COMMITTED_RESULTS)
    if args.stage == "next":
        stage, why = next_stage()
        print(f"next: python3 -m tools.gpu_plan {stage}   ({why})")
        return 0
    if args.stage == "_matrix":
        return matrix_child(args)
    if args.stage == "_packing":
        return packing_child(args)
    if args.stage == "dali":
        return dali_stage(args)
    return first_contact(args) if args.stage == "first-contact" else reproduce(args)

