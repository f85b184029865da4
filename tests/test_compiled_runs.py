"""torch.compile on the CPU through everything a run does: packed seeds, evaluation in eval mode,
SIGTERM while it compiles, --time-limit, and resuming, which recompiles and must stay bit-identical
to the uninterrupted compiled run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.test_cli import ROOT, TINY, load_weights, make_dataset, run

# PreResNet-8, two seeds packed, bf16 autocast, channels-last, compiled: 12 steps an epoch
COMPILED = [*TINY, "--epochs", "2", "--seeds", "0,1", "--amp", "bf16", "--channels-last", "--compile"]
SEEDS = ("seed-0", "seed-1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shapes"))


def assert_same_run(folder, reference):
    for name in SEEDS:
        mine, theirs = load_weights(folder / name), load_weights(reference / name)
        assert mine["epoch"] == theirs["epoch"] == 2
        for key, tensor in theirs["model"].items():
            assert torch.equal(mine["model"][key], tensor), (name, key)
        for state, other in zip(mine["optimizer"]["state"].values(), theirs["optimizer"]["state"].values()):
            assert torch.equal(state["momentum_buffer"], other["momentum_buffer"]), name
        lines = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
        reference_lines = [json.loads(line) for line in (reference / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["train_loss"] for m in lines] == [m["train_loss"] for m in reference_lines]
        assert [m["test_error"] for m in lines] == [m["test_error"] for m in reference_lines]


@pytest.mark.slow
def test_a_compiled_run_survives_sigterm_in_compilation_the_time_limit_and_resuming(data_dir, tmp_path):
    reference = tmp_path / "reference"
    # TORCH_LOGS=recompiles: evaluation (eval mode, no grad) may recompile once; nothing else may
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMPILED, "--data-dir", str(data_dir),
                             "--out", str(reference)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env={**env, "TORCH_LOGS": "recompiles"})
    assert result.returncode == 0, result.stderr
    reasons = [line.split("- ", 1)[1] for line in result.stderr.splitlines() if "[__recompiles]     - " in line]
    assert all("grad_mode" in reason or "training" in reason for reason in reasons), reasons
    assert len(reasons) <= 1, reasons  # the seeds share one compiled graph for training and one for evaluation
    for name in SEEDS:
        # autocast leaves the weights, BatchNorm statistics and momentum in fp32: so does the checkpoint
        checkpoint = load_weights(reference / name)
        floats = [t for t in [*checkpoint["model"].values(), *(s["momentum_buffer"] for s in
                                                              checkpoint["optimizer"]["state"].values())]
                  if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float32 for t in floats)
        config = json.loads((reference / name / "config.json").read_text())
        assert config["runtime"]["compile"] is True and config["runtime"]["amp"] == "bf16"
        first = json.loads((reference / name / "metrics.jsonl").read_text().splitlines()[0])
        assert first["compile_seconds"] > 0 and first["eval_compile_seconds"] > 0

    part = tmp_path / "part"
    command = [sys.executable, str(ROOT / "train.py"), *COMPILED, "--data-dir", str(data_dir), "--out", str(part)]
    # TORCH_LOGS=dynamo: Dynamo says when it starts tracing the first step's forward, which it then
    # compiles for seconds; the signal lands there
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**env, "TORCH_LOGS": "dynamo"})
    for line in process.stderr:
        if "start tracing" in line:
            process.send_signal(signal.SIGTERM)
            break
    stderr = process.stderr.read()
    process.wait(timeout=900)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    for name in SEEDS:  # stopped at the end of the step that was compiling
        stopped = load_weights(part / name)
        assert stopped["epoch"] == 0 and stopped["position"]["step"] == 1, (name, stopped["position"])

    # the rest of epoch 1 (a command's first epoch always runs), then --time-limit stops it
    result = run("train.py", *COMPILED, "--data-dir", data_dir, "--out", part, "--resume", "auto", "--time-limit", "1",
                 check=True, timeout=900)
    assert "stopping before epoch 2 of 2" in result.stderr, result.stderr
    assert all(load_weights(part / name)["epoch"] == 1 for name in SEEDS)
    run("train.py", "--resume", part, "--no-progress", check=True, timeout=900)
    assert_same_run(part, reference)
    commands = [json.loads(line) for line in (part / "seed-0" / "commands.jsonl").read_text().splitlines()]
    assert [c["epochs"] for c in commands] == [[], [1, 1], [2, 2]]  # the SIGTERMed one finished no epoch
    assert commands[0]["stopped_in"] == {"epoch": 1, "step": 1} and "stopped_in" not in commands[1]
    assert all(c["compile"] and c["amp"] == "bf16" for c in commands)
