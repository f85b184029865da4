"""The training loop behind train.py, and the pieces eval.py shares with it (runtime, checkpoints).

A run's folder holds config.json, metrics.jsonl (one line per epoch), curves.png and checkpoint.pt,
the last three rewritten atomically after every epoch. Everything random in epoch e follows from
(seed, e), and the checkpoint holds model, optimizer and grad-scaler state at the epoch's end, so a
run resumed from it continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed, faults
from .data import Dataset, channel_mean_std, load_dataset
from .errors import UserError
from .loaders import MODEL_STREAM, BaseLoader, build_loader, dali_available, epoch_seed
from .models import build_model
from .recipes import Recipe, learning_rate
from .steps import make_optimizer

CHECKPOINT_FORMAT = "preresnet-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint-prev.pt"  # the checkpoint before the last one, kept in case the last is unreadable
# a finished run's final weights for eval.py (bench/gpu_plan.py exports them): config, recipe, epoch,
# metrics and the state_dict (weights in bf16), without optimizer state: not resumable
WEIGHTS_FORMAT = "preresnet-weights-1"
EVAL_BATCH_SIZE = 500
PROGRESS_EVERY = 20  # steps between progress-bar refreshes; each one waits for the device


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops and its last checkpoint stays as it was."""


class StoppedInEpoch(Exception):
    """Every rank agreed to stop (faults.stop_requested) before the end of an epoch; position is
    what this rank needs to continue the epoch exactly: the steps done, its running sums, its
    random state."""

    def __init__(self, position: dict):
        super().__init__(f"stopped after step {position['step']}")
        self.position = position


def random_state(device: torch.device) -> dict:
    """The generator dropout draws from on device (the only torch randomness of a training step)."""
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    return {"device": device.type, "state": state}


# --- runtime: device, precision, layout, compilation ----------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: str  # "off" | "bf16" | "fp16"
    channels_last: bool
    compile: bool
    loader: str  # "torch" | "dali"
    fused: bool = False  # the Triton kernels of kernels/
    sync_bn: bool = False  # BatchNorm statistics over all ranks (multi-process runs)
    dist: distributed.Dist = distributed.Dist()
    cuda_graphs: bool = False  # the whole step (and evaluation) captured in CUDA graphs: preresnet/steps.py

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    def autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        return (f"device {self.device}, amp {self.amp}, channels-last {'on' if self.channels_last else 'off'}, "
                f"compile {'on' if self.compile else 'off'}, {'fused' if self.fused else 'unfused'}, {self.loader} loader, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}")


def resolve_runtime(device: str = "auto", amp: str = "auto", channels_last: bool | None = None,
                    compile: bool | None = None, loader: str = "auto", fused: bool | None = None,
                    sync_bn: bool | None = None, dist: distributed.Dist = distributed.Dist(),
                    cuda_graphs: bool | None = None) -> Runtime:
    """Fill in 'auto' (None): on a GPU the fastest correct settings, on the CPU the ones that work."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if device not in ("cuda", "cpu"):
        raise UserError(f"unknown device {device!r}: choose auto, cuda or cpu")
    on_gpu = device == "cuda"
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "off"
    if amp not in ("off", "bf16", "fp16"):
        raise UserError(f"unknown --amp {amp!r}: choose auto, bf16, fp16 or off")
    if fused and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--fused on the CPU runs the Triton kernels under the interpreter (slow; meant for tests): "
                        "set TRITON_INTERPRET=1, or train on a GPU")
    if loader == "auto":
        loader = "dali" if dali_available() else "torch"
    if loader == "dali" and not dali_available():
        raise UserError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or -cuda130), or use --loader torch")
    return Runtime(
        device=torch.device(device, dist.local_rank) if on_gpu and dist.enabled else torch.device(device),
        amp=amp,
        channels_last=on_gpu if channels_last is None else channels_last,
        compile=on_gpu if compile is None else compile,
        loader=loader,
        fused=bool(fused),
        sync_bn=bool(sync_bn),
        dist=dist,
        cuda_graphs=on_gpu if cuda_graphs is None else cuda_graphs,
    )


# --- checkpoints ------------------------------------------------------------------------------------


class WriteFailed(UserError):
    """A file of the run could not be written (a full disk, a read-only folder); none was changed."""


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_files(writes: dict[Path, Callable[[Path], None]]) -> None:
    """Call each write(tmp_path), then rename every temporary file over its path. Readers never see
    a half-written file, and a write that fails (the step that needs space) raises WriteFailed
    before any of the files has changed."""
    tmps = {}
    try:
        for path, write in writes.items():
            tmps[path] = tmp = temporary_path(path)
            try:
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise WriteFailed(f"cannot write {path}: {detail}; the run stopped with its files as they were "
                                  f"before this save (free space or fix the folder, then continue with --resume "
                                  f"{path.parent})") from None
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over path: readers never see a half-written file."""
    write_files({path: write})


def link_or_copy(source: Path, target: Path) -> None:
    """target becomes the file source is now: a hard link (no copy, no space) where the filesystem has them."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a process killed while writing (SIGKILL leaves them); each can be as big as a checkpoint."""
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, "metrics.jsonl", "curves.png", "config.json"):
        for tmp in out.glob(f".{name}.*.tmp"):
            if tmp != temporary_path(out / name):  # another process's
                tmp.unlink(missing_ok=True)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, weights_ok: bool = False) -> dict:
    """Read a checkpoint written by train.py (weights_ok: or exported weights, WEIGHTS_FORMAT); any
    problem is a one-line UserError."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    previous = path.with_name(PREVIOUS_NAME)
    hint = (f"; the checkpoint before it is kept: continue from it with --resume {previous}"
            if path.name == CHECKPOINT_NAME and previous.is_file() else "")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the CRC-32s: damaged tensors would load
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"damaged bytes in {damaged.split('/', 1)[-1]} (CRC-32 mismatch)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zipfile and torch.load raise many types for truncated or foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint?): {first_line}{hint}") from None
    if isinstance(checkpoint, dict) and checkpoint.get("format") == WEIGHTS_FORMAT:
        if weights_ok:
            return checkpoint
        raise UserError(f"{path} holds a finished run's exported weights (for eval.py), not a checkpoint to resume")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project's train.py{hint}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the network a checkpoint's config describes and load its weights into it."""
    config = checkpoint["config"]
    model = build_model(config["type"], config["depth"], config["width"], num_classes=config["num_classes"],
                        dropout=config["dropout"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"checkpoint {path} does not hold a {model.paper_name} as its config says: {detail[:300]}") from None
    return model


# --- one epoch ----------------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, loader: BaseLoader, runtime: Runtime, num_classes: int) -> dict:
    """Test loss and error over every sample of loader once, with per-class accuracy."""
    model.eval()
    device = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    count = torch.zeros(num_classes, dtype=torch.int64, device=device)
    with torch.no_grad(), runtime.autocast():
        for x, y in loader:
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            hits = (logits.argmax(1) == y).long()
            correct.index_add_(0, y, hits)
            count.index_add_(0, y, torch.ones_like(y))
    for tensor in (loss_sum, correct, count):  # every rank evaluated its own share of the test set
        distributed.all_reduce_sum(tensor)
    total = int(count.sum())
    return {
        "test_loss": float(loss_sum) / total,
        "test_error": 1.0 - int(correct.sum()) / total,
        "per_class_accuracy": [(int(c) / int(n)) if n else None for c, n in zip(correct, count)],
        "test_images": total,
    }


def train_epoch(model, step_fn, loader: BaseLoader, optimizer, recipe: Recipe, epoch: int, iteration: int,
                runtime: Runtime, disable_bar: bool | None, resume_at: dict | None = None) -> tuple[dict, int]:
    """One pass over the training data; returns the epoch's metrics and the next iteration number.

    resume_at: the position of a checkpoint written inside this epoch (StoppedInEpoch's, one entry
    per rank): the epoch continues after its step as if it had never stopped. Raises
    StoppedInEpoch when a stop signal reached any rank (see faults)."""
    from tqdm import tqdm

    model.train()
    first = resume_at["step"] if resume_at else 0
    loader.set_epoch(epoch, first)
    torch.manual_seed(epoch_seed(loader.seed, epoch, MODEL_STREAM, runtime.dist.rank))  # dropout draws, own per rank
    device, dist = runtime.device, runtime.dist
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    errors = torch.zeros((), dtype=torch.int64, device=device)
    seen, earlier_seconds = 0, 0.0
    if resume_at:
        ranks = resume_at["ranks"]
        if len(ranks) == dist.world_size:  # each rank continues its own sums and dropout draws
            mine = ranks[dist.rank]
            loss_sum.fill_(mine["loss_sum"])
            errors.fill_(mine["errors"])
            seen = mine["seen"]
            if mine["random"]["device"] == device.type:
                if device.type == "cuda":
                    torch.cuda.set_rng_state(mine["random"]["state"], device)
                else:
                    torch.set_rng_state(mine["random"]["state"])
        elif dist.is_main:  # another number of processes: the epoch's sums are right, its dropout draws new
            loss_sum.fill_(sum(r["loss_sum"] for r in ranks))
            errors.fill_(sum(r["errors"] for r in ranks))
            seen = sum(r["seen"] for r in ranks)
        earlier_seconds = resume_at["train_seconds"]
    bar = tqdm(total=len(loader), initial=first, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch",
               disable=disable_bar if runtime.dist.is_main else True, leave=False, dynamic_ncols=True)
    check_replicas = os.environ.get("PRERESNET_CHECK_REPLICAS") == "1"
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader, start=first):
        lr = learning_rate(recipe, epoch, iteration)
        if hasattr(step_fn, "set_lr"):  # preresnet.steps: a float, or a device tensor a captured step reads
            step_fn.set_lr(lr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss, logits = step_fn(x, y)
        loss_sum += loss.detach().double() * len(y)
        errors += (logits.detach().argmax(1) != y).sum()
        seen += len(y)
        iteration += 1
        if check_replicas and not distributed.replicas_agree(model):
            raise RuntimeError(f"rank {runtime.dist.rank}: parameters differ across ranks after step {step + 1}")
        stop = faults.stop_requested() is not None  # a Python flag: no wait for the device
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == len(loader):
            mean_loss = float(loss_sum) / seen  # waits for the device
            # every rank decides together, or one would stop while the others wait in a collective:
            # on a non-finite loss, and on a stop signal that reached any of them
            flags = distributed.all_reduce_sum(torch.tensor([float(not math.isfinite(mean_loss)), float(stop)],
                                                            device=device))
            diverged, stop = (bool(flag) for flag in flags.tolist())
            if diverged:
                bar.close()
                raise NonFiniteLoss(f"the training loss became {mean_loss} in epoch {epoch + 1} (step {step + 1})")
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:g}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(step + 1 - bar.n)
        elif dist.enabled:
            stop = False  # ranks stop only at a step where they have agreed to (latency: PROGRESS_EVERY steps)
        if stop and step + 1 < len(loader):  # at the last step the epoch ends, is evaluated and saved first
            bar.close()
            raise StoppedInEpoch({"step": step + 1, "iteration": iteration, "loss_sum": float(loss_sum),
                                  "errors": int(errors), "seen": seen, "random": random_state(device),
                                  "train_seconds": earlier_seconds + time.perf_counter() - start})
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = earlier_seconds + time.perf_counter() - start
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, errors.double(), torch.tensor(float(seen), device=device,
                                                                                           dtype=torch.float64)]))
    loss_sum, errors, seen = totals[0], totals[1], int(totals[2])
    if not distributed.replicas_agree(model):
        raise RuntimeError(f"rank {runtime.dist.rank}: parameters differ across ranks after epoch {epoch + 1}")
    return {
        "lr": lr,
        "train_loss": float(loss_sum) / seen,
        "train_error": int(errors) / seen,
        "train_seconds": seconds,
        "images_per_second": seen / seconds,
    }, iteration


def step_timings(step_fn, eval_forward) -> dict:
    """Time to the first step in this process (compile_seconds: compilation, autotuning and warm-up
    included), graph capture (capture_seconds), and the same for evaluation; only in the epoch where
    they happened, so a resumed run reports its own."""
    timings = {}
    for part in (step_fn, eval_forward):
        if hasattr(part, "take_timings"):
            timings.update(part.take_timings())
    return timings


def describe_timings(metrics: dict) -> str:
    parts = [f"{label} {metrics[key]:.1f} s" for key, label in (
        ("compile_seconds", "first step"), ("capture_seconds", "capture"), ("eval_compile_seconds", "first eval batch"),
        ("eval_capture_seconds", "eval capture")) if key in metrics]
    return f"  ({', '.join(parts)})" if parts else ""


def make_step_fn(model, optimizer, scaler, runtime: Runtime):
    """forward, loss, backward and optimizer step for one batch, and the evaluation forward
    (preresnet/steps.py): with --compile the model's forward (and so its backward) is compiled; with
    --cuda-graphs on a GPU the whole step, optimizer included, is captured once and replayed, and so
    is the evaluation forward. The step has set_lr(lr), take_timings() and describe()."""
    from .steps import build_step

    if runtime.compile and runtime.dist.enabled:
        # DDP broadcasts BatchNorm buffers before each forward, which Dynamo cannot trace: one graph
        # break there, announced once per rank (pytorch/pytorch#141827); the model itself compiles.
        warnings.filterwarnings("ignore", message=".*_broadcast_coalesced")
    return build_step(model, optimizer, scaler, runtime)


# --- the run ------------------------------------------------------------------------------------------


def save_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], label="train loss")
    ax_loss.plot(epochs, [m["test_loss"] for m in history], label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_err.plot(epochs, [100 * m["train_error"] for m in history], label="train error")
    ax_err.plot(epochs, [100 * m["test_error"] for m in history], label="test error")
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def metrics_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_lines(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(metrics_text(rows)))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(config: dict, recipe: Recipe, out: Path, runtime: Runtime, resume_from: dict | None = None,
        progress: bool | None = None, dataset: Dataset | None = None, deadline: float | None = None,
        keep_previous: bool = True) -> dict:
    """Train config's network with recipe into out; returns the final epoch's metrics.

    config holds the model, data and seed (it must already carry num_classes, mean and std);
    resume_from is a loaded checkpoint of this same run. keep_previous: whether the checkpoint now
    in out becomes checkpoint-prev.pt at the first save (not when the run resumed from another
    file, say because out's own was unreadable). A stop signal (faults) ends the run with
    faults.Interrupted once its position is saved. deadline (time.monotonic()): no epoch is
    started that would not end before it, judged by the longest epoch so far (the run stops with its
    checkpoint written; a later --resume continues it).
    """
    if dataset is None:
        dataset = load_dataset(config["dataset"], config["data_dir"])
    if dataset.num_classes != config["num_classes"]:
        raise UserError(f"the data has {dataset.num_classes} classes but the run was set up for {config['num_classes']}")
    disable_bar = None if progress is None else not progress
    device, dist = runtime.device, runtime.dist
    if recipe.batch_size % dist.world_size:
        raise UserError(f"batch size {recipe.batch_size} (the global batch) does not split evenly over {dist.world_size} processes")
    common = dict(backend=runtime.loader, device=device, channels_last=runtime.channels_last,
                  mean=config["mean"], std=config["std"], rank=dist.rank, world_size=dist.world_size)
    train_loader = build_loader(dataset.train.images, dataset.train.labels, batch_size=recipe.batch_size // dist.world_size,
                                train=True, seed=config["seed"], **common)
    test_loader = build_loader(dataset.test.images, dataset.test.labels, batch_size=EVAL_BATCH_SIZE, train=False,
                               **common)

    torch.manual_seed(config["seed"])
    model = build_model(config["type"], config["depth"], config["width"], num_classes=config["num_classes"],
                        fused=runtime.fused, dropout=config["dropout"])
    if runtime.sync_bn:
        distributed.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
    on_torch_ops = {}
    # layers where measurements found PyTorch's ops faster than the Triton kernel; with --sync-bn
    # every layer stays on the kernel, which reduces across processes in its backward
    if runtime.fused and not runtime.sync_bn:
        from .kernels.paths import assign_paths

        on_torch_ops = assign_paths(model, device, runtime.amp_dtype or torch.float32)
    optimizer = make_optimizer(model, recipe, device)  # fused SGD: the plain and the captured step share it
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == "fp16")
    start_epoch, iteration, history = 0, 0, []
    if resume_from is not None:
        history = read_metrics(out / "metrics.jsonl")
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        if resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        start_epoch, iteration = resume_from["epoch"], resume_from["iteration"]
        position = resume_from.get("position")  # where a run stopped inside epoch start_epoch + 1
        history = [m for m in history if m["epoch"] <= start_epoch]  # drop lines past the checkpoint
        if start_epoch and (not history or history[-1]["epoch"] < start_epoch):  # killed between checkpoint and metrics
            history.append(resume_from["metrics"])
        if dist.is_main:
            write_lines(out / "metrics.jsonl", history)
    else:
        position = None
    if dist.is_main:
        remove_stale_temporaries(out)
    wrapped = model
    if dist.enabled:  # gradients averaged over ranks; rank 0's initial weights broadcast
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn, forward = make_step_fn(wrapped, optimizer, scaler, runtime)
    say = print if dist.is_main else (lambda *args, **kwargs: None)

    say(f"{model.paper_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(dataset.train.labels)} training / {len(dataset.test.labels)} test images, {runtime.describe()}; "
        f"writing to {out}", file=sys.stderr)
    say(f"step: {step_fn.describe()}", file=sys.stderr)
    if on_torch_ops:
        say(f"fused: {len(on_torch_ops)} layers run PyTorch's ops, measured faster there than the Triton kernel "
            f"(kernels/conv_paths.json): {', '.join(on_torch_ops)}", file=sys.stderr)
    if position:
        say(f"resuming in epoch {start_epoch + 1} after step {position['step']} (iteration {iteration})", file=sys.stderr)
    elif start_epoch:
        say(f"resuming after epoch {start_epoch} (iteration {iteration})", file=sys.stderr)

    def save(completed: int, iteration: int, position: dict | None) -> None:
        """Rank 0 writes the checkpoint and metrics.jsonl together, keeping the checkpoint before it."""
        nonlocal keep_previous
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "recipe": asdict(recipe),
            "epoch": completed,
            "iteration": iteration,
            "position": position,  # None at the end of an epoch
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "metrics": history[-1] if history else None,
        }
        writes = {}
        if keep_previous and (out / CHECKPOINT_NAME).is_file():
            writes[out / PREVIOUS_NAME] = lambda tmp: link_or_copy(out / CHECKPOINT_NAME, tmp)
        writes[out / CHECKPOINT_NAME] = lambda tmp: torch.save(checkpoint, tmp)
        writes[out / "metrics.jsonl"] = lambda tmp: tmp.write_text(metrics_text(history))
        write_files(writes)
        keep_previous = True

    def stop_agreed() -> bool:
        """Whether a stop signal reached any process (one small all-reduce, at start-up and after each epoch)."""
        return bool(distributed.all_reduce_sum(torch.tensor(float(faults.stop_requested() is not None),
                                                            device=device)).item())

    if stop_agreed():  # a signal during start-up: the checkpoint is current
        raise faults.Interrupted(faults.stop_requested(), start_epoch, position["step"] if position else 0,
                                 len(train_loader), out)
    for epoch in range(start_epoch, recipe.epochs):
        if epoch_will_pass(deadline, history, epoch, start_epoch):
            say(f"stopping before epoch {epoch + 1} of {recipe.epochs}: it would not end within --time-limit; "
                f"continue with --resume {out}", file=sys.stderr)
            break
        epoch_start = time.perf_counter()
        try:
            train_metrics, iteration = train_epoch(wrapped, step_fn, train_loader, optimizer, recipe, epoch, iteration,
                                                   runtime, disable_bar, resume_at=position)
        except StoppedInEpoch as stopped:
            mine = stopped.position
            ranks = distributed.gather_object({key: mine[key] for key in ("loss_sum", "errors", "seen", "random")})
            if dist.is_main:
                save(epoch, mine["iteration"], {"step": mine["step"], "train_seconds": mine["train_seconds"],
                                                "ranks": ranks})
            distributed.barrier()  # no rank exits (and has torchrun stop the others) before the write is done
            raise faults.Interrupted(faults.stop_requested(), epoch, mine["step"], len(train_loader), out) from None
        position = None
        test_metrics = evaluate(forward, test_loader, runtime, config["num_classes"])
        metrics = {"epoch": epoch + 1, **train_metrics,
                   "test_loss": test_metrics["test_loss"], "test_error": test_metrics["test_error"],
                   "test_images": test_metrics["test_images"], "epoch_seconds": time.perf_counter() - epoch_start,
                   "processes": dist.world_size, **step_timings(step_fn, forward)}
        history.append(metrics)
        if dist.is_main:  # only rank 0 writes the run folder
            save(epoch + 1, iteration, None)
            save_curves(history, out / "curves.png", f"{model.paper_name} on {config['dataset']}")
        # a signal during the evaluation or the save: the checkpoint is current. Decided before the
        # epoch's line is printed, so that a signal sent once it is out lands in the next epoch's steps.
        stop = epoch + 1 < recipe.epochs and stop_agreed()
        say(f"epoch {epoch + 1}/{recipe.epochs}  lr {metrics['lr']:g}  train loss {metrics['train_loss']:.4f}  "
              f"train error {100 * metrics['train_error']:.2f}%  test loss {metrics['test_loss']:.4f}  "
              f"test error {100 * metrics['test_error']:.2f}%  {metrics['images_per_second']:.0f} img/s  "
              f"{metrics['epoch_seconds']:.1f} s{describe_timings(metrics)}", flush=True)
        if stop:
            raise faults.Interrupted(faults.stop_requested(), epoch + 1, 0, len(train_loader), out)
    return history[-1] if history else {}


def epoch_will_pass(deadline: float | None, history: list[dict], epoch: int, first_epoch: int) -> bool:
    """Whether another epoch would end after the deadline: expected to take as long as the longest
    epoch of this process less its one-off compilation and capture. The first epoch of a process
    always starts (a command that trains nothing makes no progress; one that overruns is stopped at
    a step boundary by SIGTERM, as bench/gpu_plan.py does)."""
    if deadline is None:
        return False
    one_off = ("compile_seconds", "capture_seconds", "eval_compile_seconds", "eval_capture_seconds")
    mine = [m.get("epoch_seconds", 0.0) - sum(m.get(key) or 0.0 for key in one_off)  # compiled once per process
            for m in history if m.get("epoch", 0) > first_epoch]
    return bool(mine) and time.monotonic() + max(mine) > deadline


def prepare_config(data: Dataset, **fields) -> dict:
    """The run's config: what the user chose plus what follows from the data (classes, mean, std)."""
    mean, std = channel_mean_std(data.train.images)
    return {**fields, "num_classes": data.num_classes, "classes": data.classes, "mean": mean, "std": std}
