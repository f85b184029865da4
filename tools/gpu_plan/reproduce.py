"""The GPU plan's stage `reproduce`: the paper's schedule of one network, its seeds packed, resumed
across short commands from the checkpoints each command returns (tools/gpu_plan/README.md, "Stage
reproduce"); a finished seed's final weights become an entry of the weights registry.

What travels: every unfinished run's checkpoint goes along with the next command and comes back
from this one, so the stage packs only as many runs as the carry and return limits leave room for
(checkpoint_room).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.workloads import environment
from preresnet import get_model, sweeps
from preresnet.registry import registry_name
from preresnet.runfiles import atomic_write, read_metrics, write_json
from tools.gpu_plan import returning
from tools.gpu_plan.common import (
    COMMAND,
    COMMITTED_RESULTS,
    NETWORKS,
    ROOT,
    Clock,
    cache_env,
    run_logged,
    say,
    stand_in,
)
from tools.gpu_plan.first_contact import newest_choice, passed_reports
from tools.gpu_plan.matrix import train_flags

MIN_TRAIN_SECONDS = 150  # a reproduce command with less training time left does not start train.py
DATA_ARCHIVE = ROOT / "data" / "cifar10-jpeg.tar.gz"
DATA_DESCRIPTION = "CIFAR-10 re-encoded as JPEG (lossy; not the papers' data)"
PAPER_ERROR = {"preresnet110": 0.0637, "preresnet164": 0.0546, "wrn16_4": 0.0502}
USER_DATA_DIR = "data/cifar10-jpeg"  # where README.md has the archive extracted: the folder weights entries name
DEFAULT_SEEDS = (0, 1, 2)
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "curves.png", "commands.jsonl")  # what a run folder holds
# reproduce --device cpu: fp32 as on a GPU's reference path; channels-last is 25% faster on a CPU
CPU_FLAGS = ("--device", "cpu", *train_flags("eager-fp32-cl"))
# on a GPU without a first-contact choice: the capture the gpu tests cover, without a cold compile
# in every window (the unfused eager step with CUDA graphs)
FALLBACK_VARIANT = "eager-amp-cl-graphs"


def machine(info: dict) -> str:
    """The device of an environment() as records name it: the GPU, or the CPU by its model."""
    return info.get("gpu") or f"CPU ({info['cpu']})"


def run_name(model: str, dry: bool, device: str = "cuda") -> str:
    if dry:
        return f"dryrun-{model}"
    return f"{model}-{NETWORKS[model][3]}-cifar10-jpeg" + ("-cpu" if device == "cpu" else "")


def seed_folder(seed: int) -> str:
    """The run folder of one seed inside a reproduction (train.py --seeds names them so too)."""
    return f"seed-{seed}"



def checkpoint_epoch(path: Path) -> int:
    if not path.is_file():
        return -1
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return -1


def prepare_data(args, work: Path) -> Path:
    """The extracted dataset under the work folder (kept while the machine is warm)."""
    target = work / ("dry-data" if args.dry_run else "cifar10-jpeg")
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    archive = Path(args.data_archive)
    if args.dry_run and not archive.is_file():
        stand_in(f"a synthetic 4-class folder dataset in place of {DATA_DESCRIPTION}")
        archive = work / "dry-data.tar.gz"
        make_synthetic_archive(archive)
    if not archive.is_file():
        raise SystemExit(f"gpu_plan: error: {archive} is missing: copy ../shared/data/cifar10-jpeg.tar.gz to "
                         f"data/ and carry it (tools/gpu_plan/README.md)")
    tmp = work / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    # the archive holds train/ and test/, possibly under one top folder
    root = tmp if (tmp / "train").is_dir() else next(p for p in tmp.iterdir() if (p / "train").is_dir())
    root.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_synthetic_archive(path: Path, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    staging = path.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for c, name in enumerate(("a", "b", "c", "d")):
            folder = staging / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, size=(32, 32, 3))
                image[8 * c: 8 * c + 8] = 200 + 10 * c  # a class-specific band: learnable at once
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")
    with tarfile.open(path, "w:gz") as tar:
        for sub in ("train", "test"):
            tar.add(staging / sub, arcname=sub)
    shutil.rmtree(staging)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def export_weights(local: Path, results: Path, dry: bool, env: dict, clock: Clock) -> dict:
    """A finished seed's final weights as an entry of the weights registry (preresnet/pretrained.py:
    the file, its test error and per-class accuracy measured on it, card and curves), named
    NETWORK-DATA-RECIPE-DEVICE-sSEED. It goes to the registry of the tree the results return to:
    the return tree's preresnet/weights on the GPU machine (tools.gpu_plan.returning), else this checkout's; a
    dry run's (synthetic data) to
    the results root's weights/, never to a registry the package reads. The export runs as its own
    process: a failure is recorded, and the checkpoint kept for `python -m preresnet.export` by hand."""
    config = json.loads((local / "config.json").read_text())
    on_gpu = config["runtime"]["device"].startswith("cuda")
    info = environment("cuda" if on_gpu else "cpu")
    arch, seed = (config["type"], config["depth"], config["width"]), config["seed"]
    model = next((key for key, spec in NETWORKS.items() if spec[:3] == arch), None)
    network = registry_name(*arch) or config["model"].lower().replace("-", "")
    name = f"{network}-{'synthetic' if dry else 'cifar10jpeg'}-{config['recipe_name']}-{'gpu' if on_gpu else 'cpu'}-s{seed}"
    # on a CPU with the threads its epochs were timed with (tools/gpu_plan/README.md); the stage's default is 1
    stage = ["--dry-run"] if dry else ["--model", model] + ([] if on_gpu else ["--device", "cpu", "--threads", "2"])
    if dry:
        registry = results.parents[2] / "weights"
    else:
        registry = (returning.tree() or ROOT) / "preresnet" / "weights"
    command = [sys.executable, "-m", "preresnet.export", str(local), "--registry", str(registry),
               "--name", name, "--data", "synthetic (dry run)" if dry else DATA_DESCRIPTION,
               "--data-dir", config["data_dir"] if dry else USER_DATA_DIR,
               "--device", machine(info),
               "--reproduce", " ".join([f"{COMMAND} reproduce", *stage, "--seeds", str(seed)]),
               "--source", str(results) if dry else f"bench/results/reproduce/{results.parent.name}/{results.name}"]
    command += ["--commit", info["commit"]] if info["commit"] else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(60, clock.left()))
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode != 0:
        return {"entry": name, "export_error": done.stderr.strip()[-300:]}
    meta = json.loads((registry / f"{name}.json").read_text())
    return {"entry": name, "file": meta["file"], "test_error": meta["test_error"], "bytes": meta["bytes"]}


@contextlib.contextmanager
def copying_progress(run: Path, results: Path, every: float = 5.0):
    """While the block runs, copy the run's checkpoint, metrics and curves into results whenever a new
    checkpoint appears, so that what a command returns holds the last finished save even if the
    command is killed before its own end (the run folder itself stays on the machine)."""
    stop = threading.Event()
    results.mkdir(parents=True, exist_ok=True)

    def watch():
        seen = None
        while not stop.wait(every):
            checkpoint = run / "checkpoint.pt"
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
            if stamp is None or stamp == seen:
                continue
            seen = stamp
            for file in RUN_FILES:
                if (run / file).is_file():
                    atomic_write(results / file, lambda tmp, file=file: shutil.copy2(run / file, tmp))
            returning.publish()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def reproduce(args) -> int:
    dry = args.dry_run
    on_cpu = dry or args.device == "cpu"
    clock = Clock(args.budget_seconds)
    if not on_cpu and not torch.cuda.is_available():
        print("gpu_plan: error: reproduce needs a CUDA GPU (or --device cpu, or --dry-run)", file=sys.stderr)
        return 2
    model = args.model
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = cache_env(work)
    name = run_name(model, dry, "cpu" if on_cpu else "cuda")
    results = Path(args.results) / "reproduce" / name
    committed = COMMITTED_RESULTS / "reproduce" / name
    local = work / "runs" / name
    info = environment("cpu" if on_cpu else "cuda")
    say(f"reproduce {name}: {info.get('gpu') or 'CPU'}, budget {args.budget_seconds:.0f} s")

    summary_path = results / "run.json"
    summary = {}
    for source in (summary_path, committed / "run.json", local / "run.json"):
        if source.is_file():
            candidate = json.loads(source.read_text())
            if len(candidate.get("commands", [])) >= len(summary.get("commands", [])):
                summary = candidate
    recorded = summary.get("runs", {})
    finished_seeds = [seed for seed in summary.get("seeds", []) if recorded.get(seed_folder(seed), {}).get("finished")]
    wanted = args.seeds or summary.get("seeds") or list(DEFAULT_SEEDS)
    if set(wanted) <= set(finished_seeds):  # the row's own seeds, or a weights card's command naming one of them
        say(f"{name}: seeds {wanted} are finished: nothing to do (`{COMMAND} next` names the next stage; to train a "
            f"seed again from the start: the train.py command on its weights card)")
        return 0
    try:
        seeds = row_seeds(summary.get("seeds"), args.seeds)
    except ValueError as error:
        print(f"gpu_plan: error: {name}: {error}", file=sys.stderr)
        return 2
    # a finished seed stays as it is (its record, files and weights entry); added seeds train beside it
    kept = {seed_folder(seed): recorded[seed_folder(seed)] for seed in finished_seeds}
    pending = [seed for seed in seeds if seed not in finished_seeds]
    if kept:
        say(f"{name}: seeds {finished_seeds} finished and kept; training seeds {pending}")

    # where each seed's run continues from: this machine's run folder, or the committed (or returned) checkpoint
    for seed in pending:
        folder = seed_folder(seed)
        candidates = [(checkpoint_epoch(root / folder / "checkpoint.pt"), root / folder)
                      for root in (local, results, committed)]
        epoch, source = max(candidates, key=lambda c: c[0])
        if epoch >= 0 and source != local / folder:
            shutil.rmtree(local / folder, ignore_errors=True)
            (local / folder).mkdir(parents=True)
            for file in RUN_FILES:
                if (source / file).is_file():
                    shutil.copy2(source / file, local / folder / file)
            say(f"{folder}: continuing from {source / 'checkpoint.pt'} (epoch {epoch})")
        elif epoch >= 0:
            say(f"{folder}: continuing this machine's run folder {local / folder} (epoch {epoch})")
        else:
            shutil.rmtree(local / folder, ignore_errors=True)  # nothing to continue: a fresh run
            say(f"{folder}: starting")
    data = prepare_data(args, work)

    kind, depth, width, recipe_name = NETWORKS.get(model, ("normal", 1, 1, "paper"))
    command = [sys.executable, str(ROOT / "train.py"), "--dataset", "folder", "--data-dir", str(data),
               "--recipe", recipe_name, "--loader", "torch", "--no-progress"]
    run_env = dict(env)
    if on_cpu:
        # one OpenMP thread per process unless asked for more: threads that wait for each other while
        # another program holds a core spin, and slow a shared machine's run down many times over
        run_env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if dry:
        stand_in("PreResNet-8 on a synthetic dataset for 3 epochs on the CPU, in place of the paper network on the GPU")
        command += ["--type", "normal", "--depth", "1", "--epochs", "3", "--batch-size", "16"]
        flags = ["--device", "cpu", "--no-cuda-graphs"]
    else:
        command += ["--type", kind, "--depth", str(depth)] + (["--width", str(width)] if kind == "wide" else [])
        flags = execution_flags(args, work, run_env)
    command += flags
    train_seconds = args.train_seconds if args.train_seconds else clock.left() - args.reserve_seconds
    # the first epoch of a command always runs and compiles: less than this loses the window's time
    if train_seconds < (30 if dry else MIN_TRAIN_SECONDS) and not args.train_seconds:
        say(f"only {clock.left():.0f} s left: no training in this command")
        return 1
    results.mkdir(parents=True, exist_ok=True)
    # the seeds train packed, `pack` at a time (first-contact's measured choice), one train.py --seeds
    # command per group; each group's runs are ordinary run folders local/seed-N
    pack = len(pending) if dry or on_cpu else packing_choice(model, [args.results, COMMITTED_RESULTS, work], len(pending))
    if not dry and not on_cpu:  # every unfinished run's checkpoint travels with the next command, and back
        room = checkpoint_room(model, committed)
        if room < 1:
            print(f"gpu_plan: error: the checkout and the data leave no room in the {CARRY_LIMIT >> 20} MiB a command "
                  f"takes along for one {model} checkpoint ({checkpoint_bytes(model) / 2**20:.1f} MiB)", file=sys.stderr)
            return 2
        if room < pack:
            say(f"{pack} packed runs' checkpoints would not travel: {room} at a time")
            pack = room
    outcomes = []
    train_start = time.monotonic()
    for group in [pending[i:i + pack] for i in range(0, len(pending), pack)]:
        if all(checkpoint_epoch(local / seed_folder(seed) / "checkpoint.pt") == summary_epochs(local / seed_folder(seed))
               for seed in group):
            continue  # this group is finished
        seconds = train_seconds - (time.monotonic() - train_start)
        if seconds < (1 if dry else MIN_TRAIN_SECONDS) and outcomes:
            break
        group_command = command + ["--seeds", ",".join(map(str, group)), "--resume", "auto", "--out", str(local),
                                   "--time-limit", str(max(int(seconds), 1))]
        # a command killed mid-run still returns its runs' last checkpoints
        with contextlib.ExitStack() as watching:
            for seed in group:
                watching.enter_context(copying_progress(local / seed_folder(seed), results / seed_folder(seed)))
            outcomes.append(run_logged(group_command, results / "train.log", seconds + 30, run_env))
        outcomes[-1]["command"] = " ".join(group_command[1:])
    # 143: SIGTERM, the time guard's backstop; train.py saved its position first
    ok = all(outcome["returncode"] in (0, 128 + signal.SIGTERM) for outcome in outcomes)

    runs = {}
    for seed in seeds:
        folder = seed_folder(seed)
        runs[folder] = kept.get(folder) or collect_seed(local / folder, results / folder, dry, env, clock)
    commands = summary.get("commands", []) + [{
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": machine(info),
        "seconds": round(time.monotonic() - train_start, 1),
        "returncodes": [outcome["returncode"] for outcome in outcomes],
        "epochs_after": {folder: run["epochs_done"] for folder, run in runs.items() if folder not in kept},
        "commit": info["commit"], "commands": [outcome["command"] for outcome in outcomes],
        **({"threads": args.threads} if on_cpu else {})}]
    # the row's network, recipe and runtime: those of the seeds this command trained
    config = next((json.loads((local / seed_folder(seed) / "config.json").read_text()) for seed in pending
                   if (local / seed_folder(seed) / "config.json").is_file()), {})
    finished = all(run["finished"] for run in runs.values())
    errors = [run["final_test_error"] for run in runs.values() if run["final_test_error"] is not None]
    summary = {
        "name": name, "model": model, "network": config.get("model", summary.get("network")),
        "recipe": config.get("recipe_name", summary.get("recipe")),
        "data": DATA_DESCRIPTION if not dry else "synthetic (dry run)",
        "epochs": config.get("recipe", {}).get("epochs", summary.get("epochs")),
        "seeds": seeds, "epochs_done": min(run["epochs_done"] for run in runs.values()), "finished": finished,
        "runs": runs, "test_error": sweeps.seed_statistics(errors) if finished else None,
        "paper_test_error": PAPER_ERROR.get(model),
        **wall_seconds(commands),
        "flags": flags, "runtime": config.get("runtime"), "device": machine(info),
        "gpu": info.get("gpu"), "torch": info["torch"], "triton": info["triton"], "cuda": info.get("cuda"),
        # every commit that trained the row, oldest first, not just this command's
        "commit": list(dict.fromkeys(c["commit"] for c in commands if c.get("commit"))), "commands": commands,
        "dry_run": dry,
        # what a person wrote down about the record (a command that left none, say) stays with it
        **({"record_notes": summary["record_notes"]} if summary.get("record_notes") else {}),
    }
    write_json(summary_path, summary)
    returning.publish()
    state = "finished" if finished else f"{summary['epochs_done']} of {summary['epochs']} epochs"
    say(f"reproduce {name}: {state} after {commands[-1]['seconds']:.0f} s of training; results in {results}")
    return 0 if ok else 1


def row_seeds(recorded: list[int] | None, asked: list[int] | None) -> list[int]:
    """The seeds of a reproduction: those it records, else --seeds, else DEFAULT_SEEDS. --seeds may
    add seeds to a recorded row (a one-seed row grown to three, its finished seed kept), never drop
    one: the row's statistics are over every seed it ever trained."""
    if not recorded:
        return list(asked or DEFAULT_SEEDS)
    if not asked:
        return list(recorded)
    dropped = [seed for seed in recorded if seed not in asked]
    if dropped:
        raise ValueError(f"the row trains seeds {recorded}; --seeds {','.join(map(str, asked))} would drop "
                         f"{dropped} (--seeds may only add seeds)")
    return list(recorded) + [seed for seed in dict.fromkeys(asked) if seed not in recorded]


def wall_seconds(commands: list[dict]) -> dict:
    """wall_seconds: the stage commands' wall time, None when a command's is unknown (one that
    left no record); then wall_seconds_known, the recorded ones' sum."""
    known = [c["seconds"] for c in commands if c.get("seconds") is not None]
    total = round(sum(known), 1)
    return {"wall_seconds": total} if len(known) == len(commands) else {"wall_seconds": None, "wall_seconds_known": total}


def execution_flags(args, work: Path, run_env: dict) -> list[str]:
    """train.py's execution flags: --flags, else on the CPU fp32 eager, else first-contact's choice
    (its environment added to run_env), else the unfused eager step with CUDA graphs."""
    if args.flags:
        return args.flags.split()
    if args.device == "cpu":
        return list(CPU_FLAGS)
    # this machine's own first-contact too (work/first-contact), in case its results were not copied back yet
    choice = newest_choice([args.results, COMMITTED_RESULTS, work])
    if choice:
        run_env.update(choice.get("env", {}))
        say(f"flags of the fastest correct variant first-contact measured ({choice['variant']}): {' '.join(choice['flags'])}")
        return choice["flags"]
    flags = train_flags(FALLBACK_VARIANT)
    say("no passed first-contact report on these kernels: the unfused eager step with CUDA graphs "
        f"({' '.join(flags)}); run first-contact first to use the fastest correct one")
    return flags


def summary_epochs(run: Path) -> int | None:
    """The epochs of the run's recipe (config.json), or None before it has one."""
    config = run / "config.json"
    return json.loads(config.read_text())["recipe"]["epochs"] if config.is_file() else None


def collect_seed(local: Path, results: Path, dry: bool, env: dict, clock: Clock) -> dict:
    """One seed's state after this command, its files copied into results: config, metrics, curves;
    the checkpoint while unfinished, a weights registry entry (export_weights) once finished."""
    results.mkdir(parents=True, exist_ok=True)
    history = read_metrics(local / "metrics.jsonl")
    done = checkpoint_epoch(local / "checkpoint.pt")
    epochs = summary_epochs(local)
    finished = epochs is not None and done == epochs
    for file in RUN_FILES[1:]:  # the checkpoint below; commands.jsonl too (its record of this command is the newest)
        if (local / file).is_file():
            shutil.copy2(local / file, results / file)
    run = {"epochs_done": done, "finished": finished,
           "final_test_error": history[-1]["test_error"] if finished and history else None,
           "last_test_error": history[-1]["test_error"] if history else None,
           "train_seconds": round(sum(m.get("train_seconds", 0.0) for m in history), 1),
           # training images/s of the epochs that compiled nothing (each command's first epoch compiles)
           "images_per_second": mean([m["images_per_second"] for m in history if "compile_seconds" not in m]
                                     or [m["images_per_second"] for m in history])}
    if finished:
        run["weights"] = export_weights(local, results, dry, env, clock)
    if finished and "export_error" not in run["weights"]:
        (results / "checkpoint.pt").unlink(missing_ok=True)  # the registry entry holds the final weights
    elif done >= 0:  # the newest unfinished checkpoint, or a finished one whose export failed
        shutil.copy2(local / "checkpoint.pt", results / "checkpoint.pt")
    return run


CARRY_LIMIT = 64 * 2**20  # what one command takes along: the checkout with its carried paths
CARRY_MARGIN = 4 * 2**20  # for what the results add (logs, metrics, curves, weights) before the next command


def checkpoint_bytes(model: str) -> int:
    """A checkpoint of the network: weights and momentum in fp32, the buffers, and a little more."""
    with torch.device("meta"):
        network = get_model(model)
    return 8 * sum(p.numel() for p in network.parameters()) + 4 * sum(b.numel() for b in network.buffers()) + 2**16


def traveling_bytes() -> int:
    """What a command takes to the GPU machine: the checkout's tracked and untracked-not-ignored
    files (git's view here; every file but caches on the GPU machine, whose copy holds only those)
    and the carried data archive."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
        files = [ROOT / name for name in listed if name]
        files.append(DATA_ARCHIVE)
    else:
        files = [path for path in ROOT.rglob("*") if ".git" not in path.parts and "__pycache__" not in path.parts]
    return sum(path.stat().st_size for path in set(files) if path.is_file())


def checkpoint_room(model: str, committed: Path) -> int:
    """How many of the network's checkpoints the next command can take along (and a command bring
    back): the limit less the checkout, the data and a margin, the run's own committed
    checkpoints (which the new ones replace) given back."""
    own = sum(path.stat().st_size for path in committed.glob("seed-*/checkpoint.pt"))
    free = CARRY_LIMIT - CARRY_MARGIN - (traveling_bytes() - own)
    back = returning.MAX_BYTES - CARRY_MARGIN
    return max(0, min(free, back) // checkpoint_bytes(model))


def packing_choice(model: str, results_dirs, seeds: int) -> int:
    """How many runs to pack: the choice of the newest first-contact report that passed on the current
    kernels and measured this network (its packing part), else all the seeds at once."""
    choices = [data["packing"][model]["choice"] for data in passed_reports(results_dirs)
               if data.get("packing", {}).get(model, {}).get("choice")]
    if not choices:
        say(f"no packing measurement for {model} on these kernels: the {seeds} seeds train packed together")
        return seeds
    say(f"{model}: {choices[-1]} runs packed at a time, as first-contact measured fastest")
    return choices[-1]
