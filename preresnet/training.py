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
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .data import Dataset, channel_mean_std, load_dataset
from .errors import UserError
from .loaders import MODEL_STREAM, BaseLoader, build_loader, dali_available, epoch_seed
from .models import build_model
from .recipes import Recipe, learning_rate

CHECKPOINT_FORMAT = "preresnet-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
EVAL_BATCH_SIZE = 500
PROGRESS_EVERY = 20  # steps between progress-bar refreshes; each one waits for the device


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run stops and its last checkpoint stays as it was."""


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

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    def autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        return (f"device {self.device}, amp {self.amp}, channels-last {'on' if self.channels_last else 'off'}, "
                f"compile {'on' if self.compile else 'off'}, {'fused' if self.fused else 'unfused'}, {self.loader} loader")


def resolve_runtime(device: str = "auto", amp: str = "auto", channels_last: bool | None = None,
                    compile: bool | None = None, loader: str = "auto", fused: bool | None = None,
                    sync_bn: bool | None = None, dist: distributed.Dist = distributed.Dist()) -> Runtime:
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
    )


# --- checkpoints ------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over path: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by train.py; any problem is a one-line UserError."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for truncated or foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint?): {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project's train.py")
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
                runtime: Runtime, disable_bar: bool | None) -> tuple[dict, int]:
    """One pass over the training data; returns the epoch's metrics and the next iteration number."""
    from tqdm import tqdm

    model.train()
    loader.set_epoch(epoch)
    torch.manual_seed(epoch_seed(loader.seed, epoch, MODEL_STREAM, runtime.dist.rank))  # dropout draws, own per rank
    device = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    errors = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch",
               disable=disable_bar if runtime.dist.is_main else True, leave=False, dynamic_ncols=True)
    check_replicas = os.environ.get("PRERESNET_CHECK_REPLICAS") == "1"
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        lr = learning_rate(recipe, epoch, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, logits = step_fn(x, y)
        loss_sum += loss.detach().double() * len(y)
        errors += (logits.detach().argmax(1) != y).sum()
        seen += len(y)
        iteration += 1
        if check_replicas and not distributed.replicas_agree(model):
            raise RuntimeError(f"rank {runtime.dist.rank}: parameters differ across ranks after step {step + 1}")
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == len(loader):
            mean_loss = float(loss_sum) / seen  # waits for the device
            # every rank decides together, or one would stop while the others wait in a collective
            diverged = distributed.all_reduce_sum(torch.tensor(float(not math.isfinite(mean_loss)), device=device))
            if diverged.item():
                bar.close()
                raise NonFiniteLoss(f"the training loss became {mean_loss} in epoch {epoch + 1} (step {step + 1})")
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:g}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(step + 1 - bar.n)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
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


def make_step_fn(model, optimizer, scaler, runtime: Runtime):
    """forward, loss, backward and optimizer step for one batch; with --compile the model's forward
    (and so its backward) is compiled, the optimizer step stays eager."""
    if runtime.compile and runtime.dist.enabled:
        # DDP broadcasts BatchNorm buffers before each forward, which Dynamo cannot trace: one graph
        # break there, announced once per rank (pytorch/pytorch#141827); the model itself compiles.
        warnings.filterwarnings("ignore", message=".*_broadcast_coalesced")
    forward = torch.compile(model) if runtime.compile else model

    def step(x, y):
        with runtime.autocast():
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss, logits

    return step, forward


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


def write_lines(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(config: dict, recipe: Recipe, out: Path, runtime: Runtime, resume_from: dict | None = None,
        progress: bool | None = None, dataset: Dataset | None = None) -> dict:
    """Train config's network with recipe into out; returns the final epoch's metrics.

    config holds the model, data and seed (it must already carry num_classes, mean and std);
    resume_from is a loaded checkpoint of this same run.
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
        from kernels.paths import assign_paths

        on_torch_ops = assign_paths(model, device, runtime.amp_dtype or torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == "fp16")
    start_epoch, iteration, history = 0, 0, []
    if resume_from is not None:
        history = read_metrics(out / "metrics.jsonl")
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        if resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        start_epoch, iteration = resume_from["epoch"], resume_from["iteration"]
        history = [m for m in history if m["epoch"] <= start_epoch]  # drop lines past the checkpoint
        if not history or history[-1]["epoch"] < start_epoch:  # killed between checkpoint and metrics
            history.append(resume_from["metrics"])
        if dist.is_main:
            write_lines(out / "metrics.jsonl", history)
    wrapped = model
    if dist.enabled:  # gradients averaged over ranks; rank 0's initial weights broadcast
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn, forward = make_step_fn(wrapped, optimizer, scaler, runtime)
    say = print if dist.is_main else (lambda *args, **kwargs: None)

    say(f"{model.paper_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(dataset.train.labels)} training / {len(dataset.test.labels)} test images, {runtime.describe()}; "
        f"writing to {out}", file=sys.stderr)
    if on_torch_ops:
        say(f"fused: {len(on_torch_ops)} layers run PyTorch's ops, measured faster there than the Triton kernel "
            f"(kernels/conv_paths.json): {', '.join(on_torch_ops)}", file=sys.stderr)
    if start_epoch:
        say(f"resuming after epoch {start_epoch} (iteration {iteration})", file=sys.stderr)
    for epoch in range(start_epoch, recipe.epochs):
        epoch_start = time.perf_counter()
        train_metrics, iteration = train_epoch(wrapped, step_fn, train_loader, optimizer, recipe, epoch, iteration,
                                               runtime, disable_bar)
        test_metrics = evaluate(forward, test_loader, runtime, config["num_classes"])
        metrics = {"epoch": epoch + 1, **train_metrics,
                   "test_loss": test_metrics["test_loss"], "test_error": test_metrics["test_error"],
                   "test_images": test_metrics["test_images"], "epoch_seconds": time.perf_counter() - epoch_start,
                   "processes": dist.world_size}
        history.append(metrics)
        if not dist.is_main:  # only rank 0 writes the run folder
            continue
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "recipe": asdict(recipe),
            "epoch": epoch + 1,
            "iteration": iteration,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "metrics": metrics,
        }
        atomic_write(out / CHECKPOINT_NAME, lambda tmp: torch.save(checkpoint, tmp))
        write_lines(out / "metrics.jsonl", history)
        save_curves(history, out / "curves.png", f"{model.paper_name} on {config['dataset']}")
        say(f"epoch {epoch + 1}/{recipe.epochs}  lr {metrics['lr']:g}  train loss {metrics['train_loss']:.4f}  "
              f"train error {100 * metrics['train_error']:.2f}%  test loss {metrics['test_loss']:.4f}  "
              f"test error {100 * metrics['test_error']:.2f}%  {metrics['images_per_second']:.0f} img/s  "
              f"{metrics['epoch_seconds']:.1f} s", flush=True)
    return history[-1] if history else {}


def prepare_config(data: Dataset, **fields) -> dict:
    """The run's config: what the user chose plus what follows from the data (classes, mean, std)."""
    mean, std = channel_mean_std(data.train.images)
    return {**fields, "num_classes": data.num_classes, "classes": data.classes, "mean": mean, "std": std}
