"""The training loop: a run's network, optimizer, step, data order, metrics and files
(TrainingRun), and the rounds in which one command trains its runs, one or several packed
(train_runs).

Everything random in epoch e follows from (seed, e), and the checkpoint (preresnet/runfiles.py)
holds model, optimizer and grad-scaler state at the epoch's end, or the position inside an epoch
where a stop signal came, so a run resumed from it continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from . import distributed, faults
from .curves import save_curves
from .data import Dataset, data_label
from .errors import UserError
from .evaluation import EVAL_BATCH_SIZE, evaluate
from .finetune import load_init_weights
from .loaders import MODEL_STREAM, BaseLoader, build_loader, epoch_seed
from .models import build_model
from .provenance import Command, command_record, commands_text, read_commands, this_command
from .kernels.dispatch import assign_paths
from .recipes import Recipe, learning_rate
from .reporting import command_folder, epoch_line, interrupted, packed_epoch_line, start_lines, step_timings
from .runfiles import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, COMMANDS_NAME, CURVES_NAME, DIVERGED_NAME, METRICS_NAME,
                       PREVIOUS_NAME, link_or_copy, metrics_text, read_metrics, remove_stale_temporaries, write_files,
                       write_json, write_lines)
from .runtime import Runtime
from .steps import build_step, make_optimizer, random_state, restore_random_state

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


# --- the runs of a command --------------------------------------------------------------------------


class RunSpec(NamedTuple):
    """One run of a command: its config (network, data, seed: it must already carry num_classes,
    mean and std), recipe and folder, and the loaded checkpoint it continues (None: a fresh run).
    keep_previous: whether the checkpoint now in out becomes checkpoint-prev.pt at the first save
    (not when the run resumed from another file, say because out's own was unreadable)."""

    config: dict
    recipe: Recipe
    out: Path
    checkpoint: dict | None = None
    keep_previous: bool = True


def build_network(config: dict, runtime: Runtime, fresh: bool) -> tuple[torch.nn.Module, dict]:
    """The run's network on its device, as the seed initialises it (a fresh fine-tuning run: from its
    weights), with sync-BN under --sync-bn, and the layers the fused model moves to PyTorch's ops."""
    torch.manual_seed(config["seed"])
    model = build_model(config["type"], units=config["depth"], width=config["width"],
                        num_classes=config["num_classes"], fused=runtime.fused, dropout=config["dropout"])
    if fresh and config.get("init"):  # a fine-tuning run starts from its weights
        load_init_weights(model, config["init"])
    if runtime.sync_bn:
        distributed.convert_sync_batchnorm(model)
    model.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
    # layers where measurements found PyTorch's ops faster than the Triton kernel; with --sync-bn every
    # layer stays on the kernel, which reduces across processes in its backward
    on_torch_ops = {}
    if runtime.fused and not runtime.sync_bn:
        on_torch_ops = assign_paths(model, runtime.device, runtime.amp_dtype or torch.float32)
    return model, on_torch_ops


class EpochSums:
    """A rank's running sums of the epoch in progress (loss, errors, images, seconds), kept on the
    device so that a step never waits for them.

    Resumed from a checkpoint's position (resume_at; None: a new epoch): with as many processes as
    then, each rank continues its own sums and dropout draws; with another number, rank 0 takes the
    epoch's totals and the dropout draws are new."""

    def __init__(self, resume_at: dict | None, dist: distributed.Dist, device: torch.device):
        self.device, self.dist = device, dist
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.errors = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.earlier_seconds = 0, 0.0
        if resume_at:
            ranks = resume_at["ranks"]
            same = len(ranks) == dist.world_size
            kept = [ranks[dist.rank]] if same else ranks if dist.is_main else []
            self.loss_sum.fill_(sum(r["loss_sum"] for r in kept))
            self.errors.fill_(sum(r["errors"] for r in kept))
            self.seen = sum(r["seen"] for r in kept)
            if same:
                restore_random_state(ranks[dist.rank]["random"], device)
            self.earlier_seconds = resume_at["train_seconds"]
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * len(y)
        self.errors += (logits.detach().argmax(1) != y).sum()
        self.seen += len(y)

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start

    def agree(self, stop: bool, where: str) -> tuple[float, bool]:
        """At a progress point: this rank's mean loss so far (waits for the device), and whether to
        stop. Every rank decides together, or one would stop while the others wait in a collective:
        on a non-finite loss (NonFiniteLoss), and on a stop signal that reached any of them."""
        mean_loss = float(self.loss_sum) / self.seen
        flags = distributed.all_reduce_sum(torch.tensor([float(not math.isfinite(mean_loss)), float(stop)],
                                                        device=self.device))
        diverged, stop = (bool(flag) for flag in flags.tolist())
        if diverged:
            raise NonFiniteLoss(f"the training loss became {mean_loss} {where}")
        return mean_loss, stop

    def position(self) -> dict:
        """What a checkpoint inside the epoch keeps of this rank's sums."""
        return {"loss_sum": float(self.loss_sum), "errors": int(self.errors), "seen": self.seen,
                "random": random_state(self.device), "train_seconds": self.seconds()}

    def metrics(self, lr: float) -> dict:
        """The epoch's training metrics over all ranks (waits for the device)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        seconds = self.seconds()
        totals = distributed.all_reduce_sum(torch.stack([self.loss_sum, self.errors.double(), torch.tensor(
            float(self.seen), device=self.device, dtype=torch.float64)]))
        seen = int(totals[2])
        return {"lr": lr, "train_loss": float(totals[0]) / seen, "train_error": int(totals[1]) / seen,
                "train_seconds": seconds, "images_per_second": seen / seconds}


class TrainingRun:
    """One run's network, optimizer, step, data order, metrics and files.

    A command trains one run, or several packed (train.py --seeds): then each has its own CUDA
    stream on a GPU, and where its steps draw random numbers (dropout) its own generator state,
    swapped in around each of its steps, so that it computes exactly what it would compute alone.
    status: training, then finished, stopped (a stop signal), paused (--time-limit) or diverged."""

    def __init__(self, spec: RunSpec, runtime: Runtime, train_loader: BaseLoader, test_loader: BaseLoader,
                 packed: bool, command: Command):
        config, recipe, out = spec.config, spec.recipe, spec.out
        self.config, self.recipe, self.out, self.keep_previous = config, recipe, out, spec.keep_previous
        self.runtime, self.train_loader, self.test_loader = runtime, train_loader, test_loader
        self.name = out.name
        device, dist = runtime.device, runtime.dist
        self.stream = torch.cuda.Stream(device) if packed and device.type == "cuda" else None
        if self.stream is not None:  # the images the loaders put on the device, before this stream reads them
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.own_random = packed and config["dropout"] > 0
        self.random: dict | None = None  # this run's generator state between its steps (own_random)
        self.status = "training"
        self.steps = None  # the epoch in progress: a generator of its steps (epoch_steps)
        self.shown = 0  # steps of the epoch in progress on the progress bar
        self.train_metrics: dict | None = None  # of the epoch just trained, until it is evaluated
        self.metrics: dict | None = None  # the last epoch's
        with self.active():
            model, self.on_torch_ops = build_network(config, runtime, fresh=spec.checkpoint is None)
            # fused SGD: the plain and the captured step share it
            self.optimizer = make_optimizer(model, recipe, device)
            self.scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == "fp16")
            self.epoch, self.iteration, self.history, self.position = 0, 0, [], None
            if spec.checkpoint is not None:
                self.restore(model, spec.checkpoint)
            if dist.is_main:
                remove_stale_temporaries(out)
            self.first_epoch = self.epoch  # of this command: its first epoch compiles
            # the commands that trained the run before this one (a new run: none), and this one's record
            self.earlier_commands = read_commands(out) if spec.checkpoint is not None else []
            self.started, self.command = command, command_record(runtime, command)
            self.model, self.wrapped = model, model
            if dist.enabled:  # gradients averaged over ranks; rank 0's initial weights broadcast
                self.wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None)
            self.step_fn, self.forward = build_step(self.wrapped, self.optimizer, self.scaler, runtime,
                                                      own_random_state=self.own_random)

    def restore(self, model: torch.nn.Module, checkpoint: dict) -> None:
        """Model, optimizer, scaler and position from the checkpoint; metrics.jsonl cut back to it
        (or completed by the checkpoint's last line, when a kill came between the two writes)."""
        model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.iteration = checkpoint["epoch"], checkpoint["iteration"]
        self.position = checkpoint.get("position")  # where a run stopped inside epoch self.epoch + 1
        history = [m for m in read_metrics(self.out / METRICS_NAME) if m["epoch"] <= self.epoch]
        if self.epoch and (not history or history[-1]["epoch"] < self.epoch):
            history.append(checkpoint["metrics"])
        self.history = history
        if self.runtime.dist.is_main:
            write_lines(self.out / METRICS_NAME, history)

    @contextlib.contextmanager
    def active(self):
        """This run's work: queued on its stream, drawing from its generator state."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if self.random is not None:
                restore_random_state(self.random, self.runtime.device)
            try:
                yield
            finally:
                if self.own_random:
                    self.random = random_state(self.runtime.device)

    def describe_position(self) -> str:
        step = self.position["step"] if self.position else 0
        if step:
            return f"in epoch {self.epoch + 1} after step {step} of {len(self.train_loader)}"
        return f"after epoch {self.epoch}" if self.epoch else "before its first step"

    def begin_epoch(self, deadline: float | None) -> bool:
        """Start the next epoch's steps; False when the run is done or --time-limit leaves no room."""
        if self.epoch >= self.recipe.epochs:
            self.status = "finished"
            return False
        if epoch_will_pass(deadline, self.history, self.epoch, self.first_epoch):
            self.status = "paused"
            return False
        self.epoch_start = time.perf_counter()
        self.shown = self.position["step"] if self.position else 0
        self.steps = self.epoch_steps()  # a generator: it runs inside active(), step by step
        return True

    def epoch_steps(self):
        """Train epoch self.epoch + 1, yielding after every step the steps done and, at a progress
        point, the mean loss so far (else None); returns the epoch's training metrics.

        Continues after a checkpoint's position inside this epoch as if the run had never stopped.
        Raises StoppedInEpoch when a stop signal reached any rank (see faults), NonFiniteLoss when
        the loss is not finite at a progress point."""
        model, step_fn, loader, epoch, dist = self.wrapped, self.step_fn, self.train_loader, self.epoch, self.runtime.dist
        resume_at, self.position = self.position, None
        model.train()
        first = resume_at["step"] if resume_at else 0
        loader.set_epoch(epoch, first)
        torch.manual_seed(epoch_seed(loader.seed, epoch, MODEL_STREAM, dist.rank))  # dropout draws, own per rank
        sums = EpochSums(resume_at, dist, self.runtime.device)
        check_replicas = os.environ.get("PRERESNET_CHECK_REPLICAS") == "1"
        for step, (x, y) in enumerate(loader, start=first):
            lr = learning_rate(self.recipe, epoch, self.iteration)
            step_fn.set_lr(lr)  # preresnet.steps: a float, or a device tensor a captured step reads
            loss, logits = step_fn(x, y)
            sums.add(loss, logits, y)
            self.iteration += 1
            if check_replicas and not distributed.replicas_agree(model):
                raise RuntimeError(f"rank {dist.rank}: parameters differ across ranks after step {step + 1}")
            stop = faults.stop_requested() is not None  # a Python flag: no wait for the device
            mean_loss = None
            if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == len(loader):
                mean_loss, stop = sums.agree(stop, f"in epoch {epoch + 1} (step {step + 1})")
            elif dist.enabled:
                stop = False  # ranks stop only at a step where they have agreed to (latency: PROGRESS_EVERY steps)
            if stop and step + 1 < len(loader):  # at the last step the epoch ends, is evaluated and saved first
                raise StoppedInEpoch({"step": step + 1, "iteration": self.iteration, **sums.position()})
            yield step + 1, mean_loss
        metrics = sums.metrics(lr)
        if not distributed.replicas_agree(model):
            raise RuntimeError(f"rank {dist.rank}: parameters differ across ranks after epoch {epoch + 1}")
        return metrics

    def end_epoch(self, train_metrics: dict) -> dict:
        """Evaluate the epoch just trained and save it (checkpoint, metrics, curves); its metrics."""
        runtime, config = self.runtime, self.config
        test_metrics = evaluate(self.forward, self.test_loader, runtime, config["num_classes"])
        metrics = {"epoch": self.epoch + 1, **train_metrics,
                   "test_loss": test_metrics["test_loss"], "test_error": test_metrics["test_error"],
                   "test_images": test_metrics["test_images"], "epoch_seconds": time.perf_counter() - self.epoch_start,
                   "processes": runtime.dist.world_size, "command": len(self.earlier_commands),
                   **step_timings(self.step_fn, self.forward)}
        self.history.append(metrics)
        self.epoch += 1
        self.steps = None
        if runtime.dist.is_main:  # only rank 0 writes the run folder
            self.save(None)
            data = data_label(config["dataset"], config["data_dir"])
            save_curves(self.history, self.out / CURVES_NAME, f"{self.model.paper_name} on {data}")
        return metrics

    def stop_in_epoch(self, position: dict) -> None:
        """Write the checkpoint of a run stopped inside its epoch (every rank's position gathered)."""
        self.steps = None
        ranks = distributed.gather_object({key: position[key] for key in ("loss_sum", "errors", "seen", "random")})
        self.iteration = position["iteration"]
        self.position = {"step": position["step"], "train_seconds": position["train_seconds"], "ranks": ranks}
        if self.runtime.dist.is_main:
            self.save(self.position)
        distributed.barrier()  # no rank exits (and has torchrun stop the others) before the write is done
        self.status = "stopped"

    def diverge(self, exc: NonFiniteLoss) -> None:
        """A packed run whose loss is not finite stops alone; its last checkpoint stays as it was."""
        self.steps = None
        self.status = "diverged"
        record = {"reason": "non-finite training loss", "message": str(exc), "epochs_done": self.epoch,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        write_json(self.out / DIVERGED_NAME, record)

    def save(self, position: dict | None) -> None:
        """Rank 0 writes the checkpoint and metrics.jsonl together, keeping the checkpoint before it."""
        out = self.out
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "recipe": asdict(self.recipe),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "position": position,  # None at the end of an epoch
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "metrics": self.history[-1] if self.history else None,
        }
        writes = {}
        if self.keep_previous and (out / CHECKPOINT_NAME).is_file():
            writes[out / PREVIOUS_NAME] = lambda tmp: link_or_copy(out / CHECKPOINT_NAME, tmp)
        writes[out / CHECKPOINT_NAME] = lambda tmp: torch.save(checkpoint, tmp)
        writes[out / METRICS_NAME] = lambda tmp: tmp.write_text(metrics_text(self.history))
        stopped_in = {"epoch": self.epoch + 1, "step": position["step"]} if position else None
        commands = self.earlier_commands + [this_command(self.command, self.history, self.first_epoch, self.started,
                                                         stopped_in)]
        writes[out / COMMANDS_NAME] = lambda tmp: tmp.write_text(commands_text(commands))
        write_files(writes)
        self.keep_previous = True


def train_runs(specs: list[RunSpec], runtime: Runtime, dataset: Dataset, progress: bool | None = None,
               deadline: float | None = None, packed: bool = False, after_epoch=None,
               command: Command | None = None) -> list[TrainingRun]:
    """Train the runs of one command: one, or several packed (packed=True: train.py --seeds).

    Every round trains one epoch of every run that has one to train: a step of each run in turn
    (on a GPU each queued on its own stream, so that the GPU overlaps them), then each is
    evaluated and saved. A stop signal (faults) stops every run at its next step boundary with its
    checkpoint and ends the command with faults.Interrupted. deadline (time.monotonic()): no run
    starts an epoch that would not end before it, judged by its longest epoch so far. A
    non-finite loss raises NonFiniteLoss, or with packed=True stops that run alone (its folder
    records it) while the others go on. after_epoch(runs) is called after each round. command: the
    command that trains them (what their commands.jsonl records; default: one starting now)."""
    command = Command.starting() if command is None else command
    train_loader, test_loader = build_loaders(specs, runtime, dataset)
    runs = [TrainingRun(spec, runtime, train_loader.reseeded(spec.config["seed"]), test_loader, packed, command)
            for spec in specs]
    say = print if runtime.dist.is_main else (lambda *args, **kwargs: None)
    for line in start_lines(runs, dataset, runtime, packed):
        say(line, file=sys.stderr)
    if stop_agreed(runtime.device):  # a signal during start-up: every checkpoint is current
        raise interrupted(runs, packed)
    while True:
        stepping = [run for run in runs if run.status == "training" and run.begin_epoch(deadline)]
        if not stepping:
            break
        round_start = time.perf_counter()
        done = train_round(stepping, runtime, packed, progress, say, round_start)
        for run in done:
            with run.active():
                run.metrics = run.end_epoch(run.train_metrics)
        # a signal during the evaluation or the save: the checkpoints are current. Decided before the
        # epoch's line is printed, so that a signal sent once it is out lands in the next epoch's steps.
        stop = (any(run.epoch < run.recipe.epochs for run in done) or any(run.status == "stopped" for run in runs)) \
            and stop_agreed(runtime.device)
        if done and packed:
            say(packed_epoch_line(done, time.perf_counter() - round_start), flush=True)
        elif done:
            say(epoch_line(done[0].epoch, done[0].recipe.epochs, done[0].metrics), flush=True)
        if after_epoch is not None:
            after_epoch(runs)
        if stop:
            for run in runs:
                if run.status == "training":
                    run.status = "stopped"
            raise interrupted(runs, packed)
    paused = [run for run in runs if run.status == "paused"]
    if paused:
        epochs = sorted({run.epoch + 1 for run in paused})
        say(f"stopping before epoch {'/'.join(map(str, epochs))} of {runs[0].recipe.epochs}: it would not end "
            f"within --time-limit; continue with --resume {command_folder(runs, packed)}", file=sys.stderr)
    return runs  # each finished, paused, stopped or diverged: begin_epoch leaves none training


def build_loaders(specs: list[RunSpec], runtime: Runtime, dataset: Dataset) -> tuple[BaseLoader, BaseLoader]:
    """The training and test loaders the runs share (each run reseeds the training one): the
    images on the device once. The runs must agree on what the loaders fix."""
    config, dist = specs[0].config, runtime.dist
    if dataset.num_classes != config["num_classes"]:
        raise UserError(f"the data has {dataset.num_classes} classes but the run was set up for {config['num_classes']}")
    batch_sizes = {spec.recipe.batch_size for spec in specs}
    if len(batch_sizes) > 1:
        raise UserError(f"the packed runs of one command share the data order's batch size, not {sorted(batch_sizes)}")
    batch_size = batch_sizes.pop()
    paddings = {spec.recipe.crop_padding for spec in specs}
    if len(paddings) > 1:
        raise UserError(f"the packed runs of one command share the training images and their crop padding, not "
                        f"{sorted(paddings)}")
    if batch_size % dist.world_size:
        raise UserError(f"batch size {batch_size} (the global batch) does not split evenly over {dist.world_size} processes")
    common = dict(backend=runtime.loader, device=runtime.device, channels_last=runtime.channels_last,
                  mean=config["mean"], std=config["std"], rank=dist.rank, world_size=dist.world_size)
    train_loader = build_loader(dataset.train.images, dataset.train.labels, batch_size=batch_size // dist.world_size,
                                train=True, seed=config["seed"], crop_padding=paddings.pop(), **common)
    test_loader = build_loader(dataset.test.images, dataset.test.labels, batch_size=EVAL_BATCH_SIZE, train=False,
                               **common)
    return train_loader, test_loader


def stop_agreed(device: torch.device) -> bool:
    """Whether a stop signal reached any process (one small all-reduce, at start-up and after each epoch)."""
    return bool(distributed.all_reduce_sum(torch.tensor(float(faults.stop_requested() is not None),
                                                        device=device)).item())


def train_round(stepping: list[TrainingRun], runtime: Runtime, packed: bool, progress: bool | None, say,
                round_start: float) -> list[TrainingRun]:
    """One epoch of every run in stepping, a step of each in turn, with a progress bar; the runs
    whose epoch ended (their train_metrics set). A run stopped inside its epoch saves its position;
    a packed run whose loss is not finite stops alone (else NonFiniteLoss ends the command)."""
    batch_images = stepping[0].recipe.batch_size // runtime.dist.world_size
    epochs = sorted({run.epoch + 1 for run in stepping})
    bar = tqdm(total=sum(len(run.train_loader) for run in stepping), initial=sum(run.shown for run in stepping),
               desc=f"epoch {'/'.join(map(str, epochs))}/{stepping[0].recipe.epochs}", unit="batch",
               disable=(None if progress is None else not progress) if runtime.dist.is_main else True, leave=False,
               dynamic_ncols=True)
    done: list[TrainingRun] = []
    running, round_steps = list(stepping), 0
    with contextlib.closing(bar):
        while running:
            for run in list(running):
                with run.active():
                    try:
                        steps, mean_loss = next(run.steps)
                    except StopIteration as finished:
                        running.remove(run)
                        run.train_metrics = finished.value
                        done.append(run)
                        continue
                    except StoppedInEpoch as stopped:
                        running.remove(run)
                        run.stop_in_epoch(stopped.position)
                        continue
                    except NonFiniteLoss as exc:
                        if not packed:
                            raise
                        running.remove(run)
                        run.diverge(exc)
                        say(f"{run.name}: stopped: {exc}; its last checkpoint was left as it was; the other runs go on",
                            file=sys.stderr)
                        continue
                if mean_loss is not None:
                    bar.update(steps - run.shown)
                    round_steps += steps - run.shown
                    run.shown = steps
                    bar.set_postfix({f"loss {run.name}" if packed else "loss": f"{mean_loss:.3f}", "img_s":
                                     f"{round_steps * batch_images / (time.perf_counter() - round_start):.0f}"})
    return done


def epoch_will_pass(deadline: float | None, history: list[dict], epoch: int, first_epoch: int) -> bool:
    """Whether another epoch would end after the deadline: expected to take as long as the longest
    epoch of this process less its one-off compilation and capture. The first epoch of a process
    always starts (a command that trains nothing makes no progress; one that overruns is stopped at
    a step boundary by SIGTERM, as a batch scheduler's time limit does)."""
    if deadline is None:
        return False
    one_off = ("compile_seconds", "capture_seconds", "eval_compile_seconds", "eval_capture_seconds")
    mine = [m.get("epoch_seconds", 0.0) - sum(m.get(key) or 0.0 for key in one_off)  # compiled once per process
            for m in history if m.get("epoch", 0) > first_epoch]
    return bool(mine) and time.monotonic() + max(mine) > deadline
