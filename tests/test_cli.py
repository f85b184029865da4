"""train.py and eval.py end to end, as a user runs them: subprocesses on a small synthetic dataset."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from preresnet import run_setup
from preresnet import train_cli as train
from preresnet import UserError
from preresnet.data import load_dataset
from preresnet.loaders import auto_backend, dali_available
from preresnet.recipes import resolve_recipe
from preresnet.training import RunSpec
from tests.test_recipes import parse_schedule

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "cross", "square", "stripes")
# PreResNet-8 on 4 classes x 48 images: a few seconds an epoch on 2 CPU cores
TINY = ["--type", "normal", "--depth", "1", "--dataset", "folder", "--batch-size", "16", "--no-progress",
        "--loader", "torch"]


def draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB image of a class-specific shape at a random place and colour, over noise."""
    yy, xx = np.mgrid[:32, :32]
    cy, cx = rng.integers(10, 22, size=2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
    elif kind == "cross":
        mask = (np.abs(yy - cy) < 2) | (np.abs(xx - cx) < 2)
    elif kind == "square":
        mask = (np.abs(yy - cy) < 6) & (np.abs(xx - cx) < 6)
    else:
        mask = (yy // 3) % 2 == 0
    image = rng.integers(0, 90, size=(32, 32, 3))
    image[mask] = rng.integers(150, 256, size=3)
    return image.astype(np.uint8)


def make_dataset(root: Path, train_per_class: int = 48, test_per_class: int = 16, seed: int = 0) -> Path:
    """An image folder of the four shapes, its decode cache already written: the one-line-error tests
    then see only the error, whichever test runs first (a cold cache adds 'decoding ...' to stderr)."""
    from preresnet.data import load_dataset

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(draw(kind, rng)).save(folder / f"{i:03d}.png")
    load_dataset("folder", root)
    return root


def run(script: str, *args, check: bool = False, data_dir=None, **kwargs) -> subprocess.CompletedProcess:
    if data_dir is not None:
        args = (*args, "--data-dir", data_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                            cwd=kwargs.pop("cwd", ROOT), env=env, timeout=kwargs.pop("timeout", 300), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def load_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"))


# batch 4: 48 steps an epoch, so that a kill right after epoch 1 lands inside epoch 2 on any machine
FINISHED = [*TINY, "--epochs", "3", "--seed", "7", "--batch-size", "4"]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """Three uninterrupted epochs: the reference for resume, eval and the output files."""
    out = tmp_path_factory.mktemp("runs") / "full"
    run("train.py", *FINISHED, "--out", out, data_dir=data_dir, check=True)
    return out


def test_run_folder_holds_config_metrics_curves_and_checkpoint(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"] == "PreResNet-8" and config["classes"] == list(CLASSES)
    assert config["recipe"]["epochs"] == 3 and config["recipe"]["lr"] == 0.1 and config["seed"] == 7
    runtime = config["runtime"]
    reasons = {key: runtime.pop(key) for key in ("amp_reason", "channels_last_reason", "compile_reason", "loader_reason",
                                                 "fused_reason", "cuda_graphs_reason")}
    assert runtime == {"device": "cpu", "amp": "off", "channels_last": True, "compile": False, "loader": "torch",
                       "fused": False, "sync_bn": False, "cuda_graphs": False, "processes": 1}
    # every choice left to auto names its rule; the one given (--loader torch) names the flag. The
    # CPU's flags are the tests' own (conftest: no native bf16). The compile rule counts the run's
    # steps: 3 epochs of 4 x 48 images at batch 4, under the rule's threshold
    steps = 3 * (len(CLASSES) * 48 // 4)
    assert reasons["loader_reason"] == "--loader torch"
    assert all(reason.startswith("auto: ") for key, reason in reasons.items() if key != "loader_reason"), reasons
    assert "no native bf16" in reasons["amp_reason"] and "NHWC" in reasons["channels_last_reason"]
    assert f" {steps} (under)" in reasons["compile_reason"] and "CPU" in reasons["fused_reason"] + \
        reasons["cuda_graphs_reason"]
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_seconds",
                "images_per_second"} <= set(m)
        assert 0 <= m["test_error"] <= 1 and m["images_per_second"] > 0
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = load_weights(finished_run)
    assert checkpoint["epoch"] == 3 and {"model", "optimizer", "config"} <= set(checkpoint)
    assert not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")]


def test_curves_and_eval_name_an_image_folder_by_its_own_name():
    from preresnet.data import data_label

    assert data_label("cifar10", "/home/me/data") == "cifar10"
    assert data_label("folder", "/home/me/data/cifar10-jpeg") == "cifar10-jpeg"


def test_short_training_learns_the_synthetic_task(data_dir, tmp_path):
    """Chance is 75% error; the shapes are easy once the network trains at all."""
    out = tmp_path / "learn"
    run("train.py", *TINY, "--data-dir", data_dir, "--epochs", "8", "--warmup-iters", "0", "--lr", "0.05",
        "--milestones", "6", "--out", out, check=True)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["epoch"] == 8
    assert final["test_error"] < 0.25, final
    assert final["train_loss"] < 1.0, final


def test_resume_after_sigkill_is_bit_identical(data_dir, finished_run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "train.py"), *FINISHED, "--data-dir", str(data_dir), "--out", str(out)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Epoch 1's line is printed once its checkpoint is on disk: kill during epoch 2's training steps.
    for line in process.stdout:
        if line.startswith("epoch 1/3"):
            time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert load_weights(out)["epoch"] == 1, "the kill came too late to interrupt the run"

    result = run("train.py", "--resume", out, "--no-progress", check=True)
    assert "resuming after epoch 1" in result.stderr
    resumed, reference = load_weights(out), load_weights(finished_run)
    assert resumed["epoch"] == 3
    for key, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    for state, ref_state in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert torch.equal(state["momentum_buffer"], ref_state["momentum_buffer"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference_lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in reference_lines]
    # the run's record names both commands and the epochs each trained (the killed one: up to its checkpoint)
    commands = [json.loads(line) for line in (out / "commands.jsonl").read_text().splitlines()]
    assert [c["epochs"] for c in commands] == [[1, 1], [2, 3]]
    assert [m["command"] for m in lines] == [0, 1, 1]
    assert "--seed" in commands[0]["argv"] and "--resume" in commands[1]["argv"]
    for command, trained in zip(commands, ([lines[0]], lines[1:])):
        assert command["train_seconds"] == round(sum(m["train_seconds"] for m in trained), 1)
        assert command["wall_seconds"] >= command["epoch_seconds"] > 0
        assert command["device"].startswith("CPU (") and command["threads"] >= 1 and "commit" in command
        assert (command["amp"], command["channels_last"], command["compile"]) == ("off", True, False)


def test_resume_refuses_a_changed_recipe(finished_run):
    result = run("train.py", "--resume", finished_run, "--lr", "0.5")
    assert_one_line_error(result, "--lr", "0.1")
    assert_one_line_error(run("train.py", "--resume", finished_run, "--model", "preresnet20"),
                          "the run trains PreResNet-8, not --model preresnet20 (PreResNet-20)")


def test_a_checkpoint_from_before_the_crop_padding_field_resumes_with_zeros(finished_run, tmp_path):
    """Checkpoints written before the recipe named its crop padding trained with zeros: resumed, they
    keep it, so a run in flight continues with the data it started with."""
    checkpoint = torch.load(finished_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["recipe"].pop("crop_padding") == "zeros"
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    flags = train.build_parser().parse_args(["--resume", str(tmp_path)])
    _, recipe, out, _ = run_setup.resumed_run(flags, str(tmp_path))
    assert recipe.crop_padding == "zeros" and out == tmp_path
    flags = train.build_parser().parse_args(["--resume", str(tmp_path), "--crop-padding", "reflect"])
    with pytest.raises(UserError, match="--crop-padding was 'zeros', not 'reflect'"):
        run_setup.resumed_run(flags, str(tmp_path))


def test_resume_refuses_epochs_that_train_nothing_or_never_decay(finished_run, tmp_path):
    """--resume --epochs is checked as a new run's schedule is: fewer epochs than the run has trained
    would train none and leave config.json saying another schedule than the checkpoint; a milestone
    after the new last epoch would never lower the lr. Both are one line, and nothing is written."""
    before = (finished_run / "config.json").read_bytes()
    assert_one_line_error(run("train.py", "--resume", finished_run, "--epochs", "2", "--no-progress"),
                          "--resume --epochs 2", "trained 3 epochs", "train none")
    assert (finished_run / "config.json").read_bytes() == before
    # the run at epoch 1 of a 10-epoch schedule with milestones 5 and 8
    checkpoint = torch.load(finished_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    checkpoint["epoch"], checkpoint["iteration"] = 1, 48
    checkpoint["recipe"].update(epochs=10, milestones=[5, 8])
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    flags = train.build_parser().parse_args(["--resume", str(tmp_path), "--epochs", "6"])
    with pytest.raises(UserError, match="--resume --epochs 6: the run's milestone 8 is after the last epoch"):
        run_setup.resumed_run(flags, str(tmp_path))
    flags = train.build_parser().parse_args(["--resume", str(tmp_path), "--epochs", "8"])
    assert run_setup.resumed_run(flags, str(tmp_path))[1].epochs == 8


def copy_data(data_dir: Path, target: Path, changed: bool = False) -> Path:
    """A copy of the shapes (its decode caches too); changed: with one pixel of one training image changed."""
    shutil.copytree(data_dir, target)
    if changed:
        path = target / "train" / "square" / "000.png"
        image = np.asarray(Image.open(path)).copy()
        image[0, 0, 0] ^= 1
        Image.fromarray(image).save(path)
        load_dataset("folder", target)  # its decode cache again: stderr then holds only what train.py says
    return target


def test_resume_follows_its_data_to_another_folder_bit_identically(data_dir, finished_run, tmp_path):
    """A run whose data folder moved continues with --data-dir naming the new one where it holds the
    same data (the sha256 config.json records of the classes, labels and images): it ends with the
    weights of the uninterrupted run, and its config names the new folder. Other data is one line."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    shutil.copyfile(out / "checkpoint-prev.pt", out / "checkpoint.pt")  # back to epoch 2 of 3
    assert load_weights(out)["epoch"] == 2
    other = copy_data(data_dir, tmp_path / "other", changed=True)
    assert_one_line_error(run("train.py", "--resume", out, "--data-dir", other, "--no-progress"),
                          f"--data-dir {other} does not hold the data the run trained on in {data_dir}",
                          "the sha256 of its classes, labels and images differ")
    moved = copy_data(data_dir, tmp_path / "moved")
    result = run("train.py", "--resume", out, "--data-dir", moved, "--no-progress", check=True)
    assert f"note: the run's data moved from {data_dir} to {moved} (the same data" in result.stderr
    resumed, reference = load_weights(out), load_weights(finished_run)
    assert resumed["epoch"] == 3 and resumed["config"]["data_dir"] == str(moved)
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(moved)
    for key, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


def test_a_run_set_up_before_data_hashes_follows_the_same_data_only(data_dir, finished_run, tmp_path):
    """A checkpoint written before config.json recorded data_sha256 (the runs in flight at 165a1bb)
    resumes as it is, and with a moved --data-dir where the classes and the training images' mean
    and std (its config's) are the same; other images are refused."""
    checkpoint = torch.load(finished_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    checkpoint["config"].pop("data_sha256")
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    resume = str(tmp_path / "run")

    def resumed(*flags):
        return run_setup.resumed_run(train.build_parser().parse_args(["--resume", resume, *flags]), resume)[0]

    assert resumed("--data-dir", str(data_dir)) == checkpoint["config"]
    moved = copy_data(data_dir, tmp_path / "moved")
    assert resumed("--data-dir", str(moved)) == {**checkpoint["config"], "data_dir": str(moved)}
    other = copy_data(data_dir, tmp_path / "other", changed=True)
    with pytest.raises(UserError, match="its classes and the per-channel mean and std of its training images"):
        resumed("--data-dir", str(other))


def test_a_short_run_scales_its_warm_up_and_prints_its_schedule(finished_run, data_dir, tmp_path):
    """--epochs 3 of 48 steps: the paper's 400-step warm-up becomes 7 steps (400 x 3/164), so each
    epoch trains at the lr of its place in the schedule, as the scaled milestones (1, 2) say."""
    recipe = load_weights(finished_run)["recipe"]
    assert (recipe["warmup_iters"], tuple(recipe["milestones"])) == (7, (1, 2))
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.01, 0.001])
    result = run("train.py", *TINY, "--epochs", "1", "--out", tmp_path / "one", data_dir=data_dir, check=True)
    lines = result.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PreResNet-8: "))
    [schedule] = [line for line in lines[:header] if line.startswith("lr schedule: ")]  # before training starts
    # 4 x 48 images at batch 16: 12 steps an epoch; the warm-up round(400 x 1/164) = 2 steps at 0.01
    per_epoch = len(CLASSES) * 48 // 16
    assert parse_schedule(schedule.removeprefix("lr schedule: ")) == (
        [(0.01, None, 2), (0.1, 1, per_epoch - 2)], per_epoch, per_epoch)


def schedule_of(result: subprocess.CompletedProcess) -> tuple:
    """The numbers of the one schedule line a command printed (tests.test_recipes.parse_schedule)."""
    [line] = [line for line in result.stderr.splitlines() if line.startswith("lr schedule: ")]
    return parse_schedule(line.removeprefix("lr schedule: "))


def test_resume_keeps_the_warm_up_its_run_started_with(data_dir, tmp_path):
    """The checkpoint's recipe is the run's: a longer --epochs scales nothing, and a run saved
    before the warm-up scaled (400 steps, longer than the run) continues with it, not refused."""
    out = tmp_path / "short"
    run("train.py", *TINY, "--epochs", "1", "--out", out, data_dir=data_dir, check=True)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    result = run("train.py", "--resume", out, "--epochs", "3", "--no-progress", check=True)
    assert load_weights(out)["recipe"]["warmup_iters"] == 2  # 400 x 1/164, not 400 x 3/164
    # 12 steps an epoch (4 x 48 images at batch 16); the 1-epoch run's milestone (epoch 1) kept
    per_epoch = len(CLASSES) * 48 // 16
    assert schedule_of(result) == ([(0.01, None, 2), (0.1, 1, per_epoch - 2), (0.01, 3, 2 * per_epoch)], per_epoch,
                                   3 * per_epoch)
    checkpoint = load_weights(old)
    checkpoint["recipe"]["warmup_iters"] = 400
    torch.save(checkpoint, old / "checkpoint.pt")
    result = run("train.py", "--resume", old, "--epochs", "2", "--no-progress", check=True)
    assert schedule_of(result) == ([(0.01, None, 2 * per_epoch)], per_epoch, 2 * per_epoch)  # all of it warm-up
    assert load_weights(old)["recipe"]["warmup_iters"] == 400
    assert [json.loads(line)["lr"] for line in (old / "metrics.jsonl").read_text().splitlines()] == [0.1, 0.01]


def test_packed_runs_print_each_schedule_once(capsys):
    """The runs of --seeds and lists: one line for a schedule they share, named where they differ;
    the warm-up here outlasts epoch 1 (5 steps of 3 an epoch), and the line shows it."""
    dataset = SimpleNamespace(train=SimpleNamespace(labels=np.zeros(48)))
    specs = [RunSpec({}, resolve_recipe("paper", epochs=2, batch_size=16, lr=lr), Path(f"lr-{lr}-seed-{seed}"))
             for lr in (0.1, 0.05) for seed in (0, 1)]
    # by hand: 48 images at batch 16 are 3 steps an epoch; 2 epochs warm up for round(400 x 2/164) = 5
    # steps at 0.01, and the one step after them is in epoch 2, past the milestone: lr / 10
    def schedule(lr):
        return [(0.01, None, 5), (lr / 10, 2, 1)], 3, 6

    run_setup.say_start(specs[:2], dataset)
    [line] = capsys.readouterr().err.splitlines()  # one line for the two seeds, naming neither
    assert parse_schedule(line.removeprefix("lr schedule: ")) == schedule(0.1)
    run_setup.say_start(specs, dataset)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    for lr, line in zip((0.1, 0.05), lines):
        names, _, rest = line.partition(": lr schedule: ")
        assert names == f"lr-{lr}-seed-0, lr-{lr}-seed-1" and parse_schedule(rest) == schedule(lr)


@pytest.mark.parametrize("args, fragments", [
    (["--epochs", "1", "--batch-size", "96"],  # 2 steps, and the warm-up scaled to 2
     ["the warm-up of 2 steps lasts the whole run (2 steps, 2 an epoch)", "--warmup-iters below 2"]),
    (["--epochs", "3", "--warmup-iters", "36"], ["the warm-up of 36 steps lasts the whole run (36 steps"]),
    (["--epochs", "3", "--milestones", "1,4"], ["milestone 4 is after the last epoch (3)"]),
])
def test_a_schedule_that_cannot_work_is_refused(data_dir, tmp_path, args, fragments):
    assert_one_line_error(run("train.py", *TINY, *args, "--out", tmp_path / "refused", data_dir=data_dir), *fragments)
    assert not (tmp_path / "refused").exists()


def test_fp16_with_loss_scaling_and_extending_a_finished_run(data_dir, tmp_path):
    out = tmp_path / "fp16"
    run("train.py", *TINY, "--type", "bottleneck", "--data-dir", data_dir, "--epochs", "1", "--amp", "fp16",
        "--out", out, check=True)
    first = load_weights(out)
    assert first["scaler"]["scale"] > 0 and first["config"]["type"] == "bottleneck"
    run("train.py", "--resume", out, "--epochs", "2", "--no-progress", check=True)
    extended = load_weights(out)
    assert extended["epoch"] == 2 and extended["recipe"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")
def test_dali_and_torch_loaders_train_to_identical_weights(data_dir, tmp_path):
    for backend in ("dali", "torch"):
        run("train.py", *TINY, "--data-dir", data_dir, "--epochs", "1", "--loader", backend,
            "--out", tmp_path / backend, check=True)
    dali, plain = load_weights(tmp_path / "dali"), load_weights(tmp_path / "torch")
    assert json.loads((tmp_path / "dali" / "config.json").read_text())["runtime"]["loader"] == "dali"
    for key, tensor in plain["model"].items():
        assert torch.equal(dali["model"][key], tensor), key


def test_fused_training_tracks_unfused_training(tmp_path, monkeypatch):
    """The Triton kernels (under the interpreter here: tiny data) train to the same weights, also
    with layers moved to PyTorch's ops by a path table (preresnet/kernels/conv_paths.json's format)."""
    tiny = make_dataset(tmp_path / "tiny", train_per_class=1, test_per_class=1)
    table = tmp_path / "conv_paths.json"
    table.write_text(json.dumps({"cpu": {"float32": {"16x32x32->16 k3 s1 +residual": {"path": "torch"},
                                                     "32x16x16->32 k3 s1 +residual": {"path": "torch"}}}}))
    for name, flag, paths in (("fused", "--fused", None), ("mixed", "--fused", table), ("plain", "--no-fused", None)):
        if paths:
            monkeypatch.setenv("PRERESNET_CONV_PATHS", str(paths))
        # lr 0.01 throughout, as the paper's warm-up gives it: 2 steps cannot hold a warm-up and a phase after it
        result = run("train.py", *TINY, "--data-dir", tiny, "--epochs", "1", "--batch-size", "2", flag,
                     "--warmup-iters", "0", "--lr", "0.01", "--out", tmp_path / name, check=True)
        monkeypatch.delenv("PRERESNET_CONV_PATHS", raising=False)
        if name == "mixed":
            assert "fused: 2 layers run PyTorch's ops" in result.stderr
            assert "layer1.0.conv2, layer2.0.conv2" in result.stderr
    plain = load_weights(tmp_path / "plain")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["runtime"]["fused"] is True
    for name in ("fused", "mixed"):
        fused = load_weights(tmp_path / name)
        for key, tensor in plain["model"].items():
            torch.testing.assert_close(fused["model"][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        assert fused["metrics"]["train_loss"] == pytest.approx(plain["metrics"]["train_loss"], rel=1e-4)


def test_fused_on_cpu_without_interpreter_is_a_clear_error(data_dir, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--data-dir", str(data_dir), "--fused",
                             "--out", str(tmp_path / "f")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert_one_line_error(result, "--fused", "TRITON_INTERPRET=1")


@pytest.mark.slow
def test_compile_bf16_channels_last_and_dropout_run_on_cpu(data_dir, tmp_path):
    """The GPU defaults (compile, bf16 autocast, channels-last) also work on the CPU when asked for."""
    out = tmp_path / "compiled"
    run("train.py", *TINY, "--type", "wide", "--width", "2", "--dropout", "0.3", "--data-dir", data_dir,
        "--epochs", "1", "--amp", "bf16", "--channels-last", "--compile", "--out", out, check=True, timeout=900)
    config = json.loads((out / "config.json").read_text())
    assert {key: value for key, value in config["runtime"].items() if not key.endswith("_reason")} == {
        "device": "cpu", "amp": "bf16", "channels_last": True, "compile": True, "loader": "torch", "fused": False,
        "sync_bn": False, "cuda_graphs": False, "processes": 1}
    assert config["runtime"]["amp_reason"] == "--amp bf16" and config["runtime"]["compile_reason"] == "--compile"
    assert config["model"] == "WRN-10-2" and config["recipe"]["nesterov"] is True  # the wrn recipe
    assert config["recipe"]["crop_padding"] == "reflect"
    metrics = json.loads((out / "metrics.jsonl").read_text())
    assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["test_error"] <= 1


def test_eval_round_trip(finished_run, data_dir):
    result = run("eval.py", "--checkpoint", finished_run / "checkpoint.pt", "--json", check=True)
    report = json.loads(result.stdout)
    final = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["test_error"] == pytest.approx(final["test_error"], abs=1e-12)
    assert report["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert report["model"] == "PreResNet-8" and report["epoch"] == 3 and report["test_images"] == 64
    accuracy = report["per_class_accuracy"]
    assert len(accuracy) == 4 and np.mean(accuracy) == pytest.approx(1 - report["test_error"])
    table = run("eval.py", "--checkpoint", finished_run, check=True).stdout
    assert "test error" in table and all(name in table for name in CLASSES)
    assert f"PreResNet-8 after 3 epochs, 64 test images of {data_dir.name}\n" in table


def test_eval_reproduces_the_figure_a_bf16_run_printed(data_dir, tmp_path):
    """eval.py evaluates a run as its training evaluated each epoch, in its recorded precision and
    layout (bf16 autocast, channels-last): the same test loss and error, and the report says so;
    --amp off evaluates in fp32, a figure of its own."""
    out = tmp_path / "bf16"
    run("train.py", *TINY, "--epochs", "1", "--amp", "bf16", "--out", out, data_dir=data_dir, check=True)
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    report = json.loads(run("eval.py", "--checkpoint", out, "--json", check=True).stdout)
    assert (report["test_error"], report["test_loss"]) == (final["test_error"], final["test_loss"])
    assert report["amp"] == "bf16"
    assert report["precision"].startswith("bf16 autocast") and "config.json" in report["precision"]
    fp32 = json.loads(run("eval.py", "--checkpoint", out, "--json", "--amp", "off", check=True).stdout)
    assert fp32["amp"] == "off" and fp32["precision"].startswith("fp32") and "--amp off" in fp32["precision"]
    assert fp32["test_loss"] != final["test_loss"]
    table = run("eval.py", "--checkpoint", out, check=True).stdout
    assert f"test loss {final['test_loss']:.4f}" in table and "bf16 autocast" in table


def test_eval_rejects_bad_checkpoints(finished_run, tmp_path):
    assert_one_line_error(run("eval.py", "--checkpoint", tmp_path / "missing.pt"), "does not exist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((finished_run / "checkpoint.pt").read_bytes()[:2000])
    assert_one_line_error(run("eval.py", "--checkpoint", truncated), "cannot read checkpoint")
    foreign = tmp_path / "state_dict.pt"
    torch.save(load_weights(finished_run)["model"], foreign)
    assert_one_line_error(run("eval.py", "--checkpoint", foreign), "not a checkpoint written by")
    # another architecture under the run's config: PreResNet-14 weights where PreResNet-8 is declared
    from preresnet import build_model

    other = load_weights(finished_run)
    other["model"] = build_model("normal", 2, num_classes=4).state_dict()
    mismatched = tmp_path / "other_arch.pt"
    torch.save(other, mismatched)
    assert_one_line_error(run("eval.py", "--checkpoint", mismatched), "does not hold a PreResNet-8")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "diverged"
    # epoch 1 (12 steps) trains at the warm-up lr; epoch 2 jumps to an lr that overflows
    result = run("train.py", *TINY, "--data-dir", data_dir, "--epochs", "3", "--warmup-iters", "12",
                 "--warmup-lr", "0.01", "--lr", "1e30", "--out", out)
    assert result.returncode == 1, result.stderr
    assert "non-finite" in result.stderr.lower() or "became nan" in result.stderr or "became inf" in result.stderr
    checkpoint = load_weights(out)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("args, fragments", [
    (["--type", "normal", "--depth", "3", "--width", "2"], ["width 2 is only for --type wide"]),
    (["--type", "normal", "--depth", "0"], ["depth"]),
    (["--type", "resnet", "--depth", "3"], ["--type", "invalid choice"]),
    (["--type", "normal", "--depth", "3", "--dataset", "imagenet"], ["--dataset", "invalid choice"]),
    (["--depth", "3"], ["--type and --depth are required, or --model NAME"]),
    (["--type", "normal", "--depth", "110"], ["PreResNet-662", "--model preresnet110", "--depth 18", "--units 110"]),
    (["--type", "bottleneck", "--depth", "164"], ["PreResNet-1478", "--model preresnet164", "--depth 18"]),
    (["--type", "wide", "--depth", "28", "--width", "10"], ["WRN-172-10", "--model wrn28_10", "--depth 4 --width 10"]),
    (["--type", "wide", "--depth", "40", "--width", "4"], ["for WRN-40-4 use --type wide --depth 6 --width 4;"]),
    (["--model", "preresnet110", "--depth", "3"],
     ["--model preresnet110 is PreResNet-110 (--depth 18), not --depth 3"]),
    (["--model", "wrn16_4", "--width", "8"], ["--model wrn16_4 is WRN-16-4 (--width 4), not --width 8"]),
    (["--model", "preresnet110", "--type", "bottleneck"], ["(--type normal), not --type bottleneck"]),
    (["--model", "resnet50"], ["--model", "invalid choice", "preresnet110"]),
    (["--type", "normal", "--depth", "3", "--units", "3"], ["--depth and --units", "give one"]),
    (["--type", "normal", "--depth", "1", "--dataset", "folder", "--data-dir", "/nonexistent/shapes"],
     ["/nonexistent/shapes does not exist"]),
    (["--type", "normal", "--depth", "1", "--epochs", "abc"], ["--epochs", "invalid int value"]),
    (["--type", "normal", "--depth", "1", "--milestones", "3,x"], ["--milestones"]),
    (["--type", "normal", "--depth", "1", "--seed", "-1"], ["--seed"]),
    (["--resume", "/nonexistent/run"], ["does not exist"]),
])
def test_train_rejects_bad_input_with_one_line(args, fragments):
    assert_one_line_error(run("train.py", *args), *fragments)


@pytest.mark.parametrize("batch_size", ["0", "193"])  # 192 training images
def test_train_rejects_impossible_batch_sizes(data_dir, tmp_path, batch_size):
    result = run("train.py", *TINY, "--data-dir", data_dir, "--batch-size", batch_size, "--out", tmp_path / "b")
    assert_one_line_error(result, "batch size")


def test_train_refuses_to_overwrite_a_run(finished_run, data_dir):
    result = run("train.py", *TINY, "--data-dir", data_dir, "--out", finished_run)
    assert_one_line_error(result, "already holds a run", "--resume")


def test_train_rejects_a_folder_without_test_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    result = run("train.py", *TINY, "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(result, str(tmp_path / "test"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error(data_dir, tmp_path):
    result = run("train.py", *TINY, "--data-dir", data_dir, "--device", "cuda", "--out", tmp_path / "gpu")
    assert_one_line_error(result, "--device cuda", "no CUDA GPU")


def test_model_names_a_registry_network_and_units_build_any(data_dir, tmp_path):
    out = tmp_path / "pr20"
    result = run("train.py", "--model", "preresnet20", *TINY[4:], "--epochs", "1", "--out", out, data_dir=data_dir,
                 check=True)
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["type"], config["depth"], config["width"]) == ("PreResNet-20", "normal", 3, 1)
    assert config["recipe"]["crop_padding"] == "zeros"  # the paper recipe's
    assert "final test error" in result.stdout
    parser = train.build_parser()
    assert run_setup.network(parser.parse_args(["--model", "wrn16_4", "--type", "wide", "--width", "4"])) == ("wide", 2, 4)
    assert run_setup.network(parser.parse_args(["--type", "normal", "--units", "110"])) == ("normal", 110, 1)
    assert run_setup.network(parser.parse_args(["--type", "normal", "--depth", "18"])) == ("normal", 18, 1)
    with pytest.raises(UserError, match="--depth 20 counts residual units"):
        run_setup.network(parser.parse_args(["--type", "normal", "--depth", "20"]))
    flags = parser.parse_args(["--model", "preresnet20", "--crop-padding", "reflect"])
    assert resolve_recipe("paper", **{name: getattr(flags, name) for name in run_setup.RECIPE_FLAGS}).crop_padding == \
        "reflect"


def test_help_documents_every_flag():
    text = run("train.py", "--help", check=True).stdout
    words = " ".join(text.split())
    eval_words = " ".join(run("eval.py", "--help", check=True).stdout.split())
    # --loader's default is auto_backend's rule: the torch loader, on the CPU and (DALI's GPU pipeline not yet
    # run there) on a GPU
    assert auto_backend("cpu")[0] == "torch" and auto_backend(torch.device("cuda"))[0] == "torch"
    for help_words in (words, eval_words):
        loader = help_words[help_words.index("--loader {auto,dali,torch} "):][:400]  # its entry, not the usage line
        assert "Default auto: the torch loader" in loader and "--loader dali" in loader
        assert "DALI when installed" not in help_words and "measured not slower" not in help_words
    for flag in ("--model", "--units", "--init", "--type", "--depth", "--width", "--dataset", "--data-dir", "--recipe",
                 "--epochs", "--batch-size", "--lr", "--weight-decay", "--out", "--resume", "--seed", "--device", "--amp", "--channels-last",
                 "--no-channels-last", "--compile", "--no-compile", "--fused", "--no-fused", "--crop-padding"):
        assert flag in text, flag
    assert "--json" in run("eval.py", "--help", check=True).stdout
