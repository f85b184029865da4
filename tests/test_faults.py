"""What a run survives (README, "What a run survives"): stop signals, torchrun's elastic restarts,
failed writes and unreadable checkpoints, each ending bit-identical to an uninterrupted run.

Every kill is sent once the run has printed a line that places it (an epoch's line comes after that
epoch's checkpoint is on disk and after the processes last agreed whether to stop, so a signal sent
then lands in the next epoch's steps), or while it writes a checkpoint; no test depends on a sleep
(the soak test waits a random time after such a line only to pick a random moment).
"""

import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from preresnet import faults, runfiles, training
from preresnet.training import PROGRESS_EVERY
from tests.test_cli import ROOT, TINY, assert_one_line_error, load_weights, make_dataset, run

# WRN-10-1 with dropout: the dropout draws must continue exactly too. 48 steps an epoch at batch 4.
DROPOUT = [*TINY, "--type", "wide", "--width", "1", "--dropout", "0.3", "--epochs", "3", "--seed", "7",
           "--batch-size", "4"]
# the same, as the runs of a packed command (--seeds) take it
PACKABLE = [arg for i, arg in enumerate(DROPOUT) if "--seed" not in DROPOUT[max(i - 1, 0): i + 1]]
# PreResNet-8 on 2 processes, 2 images each a step: 48 global steps an epoch, agreement every PROGRESS_EVERY
TWO = [*TINY, "--epochs", "3", "--seed", "3", "--batch-size", "4"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(args, data_dir, out, stderr_path: Path, processes: int = 1, torchrun_args=()) -> subprocess.Popen:
    """train.py (under torchrun when processes > 1) with stdout readable line by line."""
    launcher = [sys.executable, str(ROOT / "train.py")] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        *torchrun_args, str(ROOT / "train.py")]
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([*launcher, *map(str, args), "--data-dir", str(data_dir), "--out", str(out)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)


def wait_for_line(process: subprocess.Popen, prefix: str, stderr_path: Path) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    process.wait(timeout=60)
    raise AssertionError(f"no line {prefix!r}; exit {process.returncode}:\n{stderr_path.read_text()[-3000:]}")


def finish(process: subprocess.Popen, timeout: int = 300) -> int:
    process.stdout.read()  # drain, so that the run never blocks on a full pipe
    return process.wait(timeout=timeout)


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the torchrun worker of this rank (workers are torchrun's children, RANK in their environment)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit-identical weights, momentum and per-epoch training metrics."""
    mine, theirs = load_weights(out), load_weights(reference)
    assert mine["epoch"] == theirs["epoch"] and mine["position"] is None
    for key, tensor in theirs["model"].items():
        assert torch.equal(mine["model"][key], tensor), key
    for state, ref_state in zip(mine["optimizer"]["state"].values(), theirs["optimizer"]["state"].values(), strict=True):
        assert torch.equal(state["momentum_buffer"], ref_state["momentum_buffer"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference_lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error"):
        assert [m[key] for m in lines] == [m[key] for m in reference_lines], key


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """Three uninterrupted epochs of the dropout network in one process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run("train.py", *DROPOUT, "--out", out, data_dir=data_dir, check=True)
    return out


@pytest.fixture(scope="module")
def reference_two(data_dir, tmp_path_factory) -> Path:
    """Three uninterrupted epochs on 2 processes."""
    out = tmp_path_factory.mktemp("reference-two") / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *TWO, "--data-dir", str(data_dir), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_saves_the_step_and_resume_is_bit_identical(data_dir, reference, tmp_path, signum):
    out, stderr = tmp_path / "stopped", tmp_path / "stderr"
    process = start(DROPOUT, data_dir, out, stderr)
    wait_for_line(process, "epoch 1/3", stderr)  # epoch 1 is saved: the signal lands in a later epoch's steps
    process.send_signal(signum)
    assert finish(process) == 128 + signum
    message = stderr.read_text().strip().splitlines()[-1]
    assert message.startswith(f"train.py: interrupted by {signal.Signals(signum).name} in epoch ")
    assert f"--resume {out}" in message and "Traceback" not in stderr.read_text()
    saved = load_weights(out)
    assert saved["position"] is not None, "the signal came too late to land inside an epoch"
    step = saved["position"]["step"]
    assert 0 < step < 48 and f"in epoch {saved['epoch'] + 1} after step {step} of 48" in message
    assert saved["iteration"] == 48 * saved["epoch"] + step

    result = run("train.py", "--resume", out, "--no-progress", check=True)
    assert f"resuming in epoch {saved['epoch'] + 1} after step {step}" in result.stderr
    assert_same_run(out, reference)


def test_processes_stop_together_when_one_is_signalled(data_dir, reference_two, tmp_path):
    out, stderr = tmp_path / "stopped", tmp_path / "stderr"
    process = start(TWO, data_dir, out, stderr, processes=2)
    wait_for_line(process, "epoch 1/3", stderr)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGTERM)  # rank 0, which writes, gets no signal
    assert finish(process) != 0  # torchrun reports its processes' status 143 as a failure
    text = stderr.read_text()
    lines = [line for line in text.splitlines() if line.startswith("train.py: interrupted by SIGTERM")]
    assert len(lines) == 1, text[-3000:]
    saved = load_weights(out)
    assert saved["position"] is not None, "the signal came too late to land inside an epoch"
    assert saved["position"]["step"] % PROGRESS_EVERY == 0  # where the ranks agree
    assert len(saved["position"]["ranks"]) == 2

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), "--resume", str(out), "--no-progress"],
                            capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after step {saved['position']['step']}" in result.stderr
    assert_same_run(out, reference_two)


def test_torchrun_restarts_after_a_sigkill_and_the_run_continues(data_dir, reference_two, tmp_path):
    """torchrun --max-restarts restarts both processes with the same command line: --resume auto
    starts the run the first time and continues it from its checkpoint the second."""
    out, stderr = tmp_path / "elastic", tmp_path / "stderr"
    process = start([*TWO, "--resume", "auto"], data_dir, out, stderr, processes=2,
                    torchrun_args=("--max-restarts", "1"))
    wait_for_line(process, "epoch 1/3", stderr)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
    assert finish(process, timeout=600) == 0, stderr.read_text()[-3000:]
    assert "resuming after epoch" in stderr.read_text()  # the restarted group continued the run
    assert_same_run(out, reference_two)


@pytest.mark.parametrize("target", ["checkpoint", "checkpoint-runtime-error", "metrics", "config"])
def test_a_failed_write_stops_the_run_and_changes_no_file(reference, tmp_path, monkeypatch, capsys, target):
    """A full disk, simulated: the write of one file raises ENOSPC (torch.save reports it as a RuntimeError)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.copyfile(out / "checkpoint-prev.pt", out / "checkpoint.pt")  # the run after epoch 2
    metrics = out / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    if target.startswith("checkpoint"):
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if target == "checkpoint" else \
            RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")

        def fail(obj, path):
            raise error

        monkeypatch.setattr(torch, "save", fail)
    else:
        write_text, writes = Path.write_text, []

        def fail(path, text):
            if path.name.startswith(f".{target}"):
                writes.append(path)
                # metrics.jsonl: the epoch's write, next to the checkpoint's (the resume's rewrite passes)
                if target == "config" or len(writes) > 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return write_text(path, text)

        monkeypatch.setattr(Path, "write_text", fail)
    assert train.cli(["--resume", str(out), "--no-progress", "--loader", "torch"]) == 2
    err = capsys.readouterr().err  # the run's start-up lines, then the error
    assert "Traceback" not in err and err.count("train.py: error:") == 1, err
    error = err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: cannot write "), error
    assert "No space left on device" in error or "PytorchStreamWriter failed" in error, error
    assert "files as they were" in error and f"--resume {out}" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no temporary file left either
    runfiles.load_checkpoint(out)


def test_an_unreadable_checkpoint_names_the_file_and_the_previous_one(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    checkpoint, previous = out / "checkpoint.pt", out / "checkpoint-prev.pt"
    good = checkpoint.read_bytes()
    assert load_weights(out)["epoch"] == 3 and torch.load(previous, weights_only=True)["epoch"] == 2
    corrupted = bytearray(good)
    corrupted[len(good) // 2: len(good) // 2 + 64] = bytes(64)
    for damage in (good[: len(good) // 3], bytes(corrupted)):  # truncated; bytes overwritten
        checkpoint.write_bytes(damage)
        assert_one_line_error(run("train.py", "--resume", out), f"cannot read checkpoint {checkpoint}",
                              f"--resume {previous}")
    torch.save({"weights": torch.zeros(3)}, checkpoint)  # another program's file
    assert_one_line_error(run("train.py", "--resume", out), f"{checkpoint} is not a checkpoint",
                          f"--resume {previous}")
    # --resume auto makes the same checks, and refuses a changed configuration
    assert_one_line_error(run("train.py", *DROPOUT, "--resume", "auto", "--out", out, data_dir=data_dir),
                          f"--resume {previous}")
    checkpoint.write_bytes(good)
    assert_one_line_error(run("train.py", *DROPOUT, "--lr", "0.5", "--resume", "auto", "--out", out,
                              data_dir=data_dir), "--lr", "0.1")
    assert_one_line_error(run("train.py", *DROPOUT, "--resume", "auto", data_dir=data_dir), "--resume auto", "--out")

    # continuing from the previous checkpoint redoes epoch 3 exactly, and does not keep the bad file
    checkpoint.write_bytes(good[:1000])
    run("train.py", "--resume", previous, "--no-progress", check=True)
    assert_same_run(out, reference)
    assert torch.load(previous, weights_only=True)["epoch"] == 2


def kill_during_checkpoint_write(process: subprocess.Popen, out: Path) -> None:
    """SIGKILL while the run writes its next checkpoint: its temporary file (runfiles.temporary_path)
    is made a FIFO beforehand, so the write blocks once the pipe is full, with part of it written."""
    out.mkdir(parents=True, exist_ok=True)
    fifo = out / f".checkpoint.pt.{process.pid}.tmp"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([reader], [], [], 300)
        assert readable, "the run wrote no checkpoint"
        process.send_signal(signal.SIGKILL)
    finally:
        os.close(reader)


def handles(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for signum (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def start_handling(args, data_dir, out, stderr_path: Path) -> subprocess.Popen:
    """train.py, returned once it handles the stop signals (its first line), before it imports torch."""
    process = start(args, data_dir, out, stderr_path)
    deadline = time.monotonic() + 60
    while not handles(process.pid, signal.SIGTERM):
        assert process.poll() is None and time.monotonic() < deadline, "train.py did not install its handlers"
        time.sleep(0.002)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("packed", [False, True], ids=["one run", "packed"])
def test_a_signal_during_start_up_ends_the_command_cleanly(data_dir, tmp_path, signum, packed):
    """From train.py's first line a stop signal is recorded: the command ends before its first step
    with one line, no traceback, nothing written, and no advice to resume what holds no checkpoint."""
    out, stderr = tmp_path / "early", tmp_path / "stderr"
    process = start_handling([*PACKABLE, "--seeds", "0,1"] if packed else DROPOUT, data_dir, out, stderr)
    process.send_signal(signum)
    assert finish(process) == 128 + signum
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    message = text.strip().splitlines()[-1]
    assert message.startswith(f"train.py: interrupted by {signal.Signals(signum).name}")
    assert "nothing trained yet and nothing to resume" in message and "--resume" not in message
    assert not list(out.glob("**/checkpoint.pt"))


def test_a_signal_after_training_ends_changes_nothing(data_dir, tmp_path):
    """Once the last epoch is saved the command finishes and exits 0, whatever signal comes."""
    out, stderr = tmp_path / "done", tmp_path / "stderr"
    process = start([*DROPOUT, "--epochs", "1"], data_dir, out, stderr)
    wait_for_line(process, "final test error", stderr)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    assert finish(process) == 0, stderr.read_text()[-3000:]
    assert load_weights(out)["epoch"] == 1


def test_finished_handlers_ignore_signals():
    """The mechanism behind the test above, without its race against the process's exit."""
    previous = {signum: signal.getsignal(signum) for signum in faults.STOP_SIGNALS}
    try:
        faults.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert faults.stop_requested() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal in one process: at once
            os.kill(os.getpid(), signal.SIGINT)
        faults.install()
        faults.finished()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGINT):
            os.kill(os.getpid(), signum)
        assert faults.stop_requested() is None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_signal_while_the_handlers_are_installed_is_recorded(monkeypatch):
    """A SIGINT arriving after SIGTERM's handler is set and before SIGINT's (under Python's own
    KeyboardInterrupt handler) waits until all are set, and is recorded like any other. It is sent
    to this thread: at train.py's first line the process has no other, but a pytest-xdist worker
    does, and one of them would take a signal sent to the process."""
    previous = {signum: signal.getsignal(signum) for signum in faults.STOP_SIGNALS}
    set_handler = signal.signal

    def set_then_interrupt(signum, handler):
        result = set_handler(signum, handler)
        if signum == signal.SIGTERM:
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return result

    monkeypatch.setattr(signal, "signal", set_then_interrupt)
    try:
        try:
            faults.install()
        except KeyboardInterrupt:
            pytest.fail("the SIGINT reached Python's own handler: the handlers were set one at a time")
        assert faults.stop_requested() == signal.SIGINT
    finally:
        for signum, handler in previous.items():
            set_handler(signum, handler)


@pytest.mark.soak
def test_soak_ten_kills_at_random_moments(tmp_path, capsys):
    """SIGKILL and SIGTERM at random moments -- during start-up, inside epochs, during a checkpoint
    write -- of a command training 2 packed runs with dropout; each time the same command (--resume
    auto) continues, as torchrun --max-restarts or a requeued job would. Then every run is
    bit-identical to the same run trained alone, uninterrupted. The command's schedule is long
    (--epochs 400) so that every kill lands in a run with work left; the last command shortens it
    to end one epoch after the furthest run (--epochs may change on resume; the milestones are
    explicit, so the learning rates do not depend on it)."""
    seed = int(os.environ.get("PRERESNET_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data_dir = make_dataset(tmp_path / "shapes", train_per_class=8, test_per_class=2)  # 8 steps an epoch
    args = [*PACKABLE, "--milestones", "2,4", "--seeds", "3,4"]
    out, stderr = tmp_path / "soaked", tmp_path / "stderr"
    survived = []
    while len(survived) < 10:
        kind = rng.choice(["SIGKILL", "SIGTERM", "SIGKILL during a checkpoint write", "SIGTERM during start-up"])
        if kind.endswith("start-up"):
            process = start_handling([*args, "--epochs", "400", "--resume", "auto"], data_dir, out, stderr)
            process.send_signal(signal.SIGTERM)
        else:
            process = start([*args, "--epochs", "400", "--resume", "auto"], data_dir, out, stderr)
        if kind.endswith("write"):
            kill_during_checkpoint_write(process, out / rng.choice(["seed-3", "seed-4"]))
        elif not kind.endswith("start-up"):
            wait_for_line(process, "epoch ", stderr)  # this life made progress
            try:
                process.wait(timeout=rng.uniform(0, 1.0))  # a random moment of the next epoch or so
            except subprocess.TimeoutExpired:
                process.send_signal(getattr(signal, kind))
        status = finish(process)
        assert status == (-signal.SIGKILL if kind.startswith("SIGKILL") else 128 + signal.SIGTERM), \
            (kind, status, stderr.read_text()[-3000:])
        assert "Traceback" not in stderr.read_text(), stderr.read_text()[-3000:]
        saved = [load_weights(out / name) for name in ("seed-3", "seed-4") if (out / name / "checkpoint.pt").exists()]
        survived.append(f"{kind} (saved: " + ", ".join(
            f"epoch {s['epoch']} step {s['position']['step'] if s['position'] else 0}" for s in saved) + ")")
    epochs = max([load_weights(out / name)["epoch"] for name in ("seed-3", "seed-4")
                  if (out / name / "checkpoint.pt").exists()] + [4]) + 1
    run("train.py", *args, "--epochs", epochs, "--resume", "auto", "--out", out, data_dir=data_dir, check=True)
    for seed_ in (3, 4):
        reference = tmp_path / f"alone-{seed_}"
        run("train.py", *PACKABLE, "--milestones", "2,4", "--seed", seed_, "--epochs", epochs, "--out", reference,
            data_dir=data_dir, check=True)
        assert_same_run(out / f"seed-{seed_}", reference)
        assert not [path for path in (out / f"seed-{seed_}").iterdir() if path.name.endswith(".tmp")]
    with capsys.disabled():
        print(f"\nsurvived {len(survived)} kills (seed {seed}), {epochs} epochs: " + "; ".join(survived))
