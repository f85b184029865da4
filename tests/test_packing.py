"""Several runs in one command (train.py --seeds and lists): each packed run computes on the CPU
exactly what it computes alone, bit for bit -- weights, running statistics, momentum buffers and
every value of metrics.jsonl but the timings -- for the three network types, unfused and fused (the
kernels under the Triton interpreter: tiny networks and data), across an epoch boundary and two
learning-rate changes, one inside an epoch and one at the boundary, and with dropout (the unfused
WRN: --dropout is refused with --fused); the summary over seeds; a run that diverges stops alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from preresnet import provenance
from preresnet.runfiles import DIVERGED_NAME
from preresnet.sweeps import SUMMARY_NAME, seed_statistics, summary_table
from tests.test_cli import ROOT, TINY, assert_one_line_error, load_weights, make_dataset, run

TIMINGS = {"epoch_seconds", "train_seconds", "images_per_second", "compile_seconds", "capture_seconds",
           "eval_compile_seconds", "eval_capture_seconds"}
# 4 training images at batch 2: 2 steps an epoch; the warm-up ends after step 1 (an lr change inside
# epoch 1), the milestone divides the lr at the start of epoch 2 (a change at the epoch boundary)
SCHEDULE = ["--epochs", "2", "--batch-size", "2", "--warmup-iters", "1", "--warmup-lr", "0.02", "--milestones", "1"]
NETWORKS = {
    "normal": ["--type", "normal", "--depth", "1"],
    "bottleneck": ["--type", "bottleneck", "--depth", "1"],
    "wide": ["--type", "wide", "--depth", "1", "--width", "1"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=1, test_per_class=1)


def train_cli(*args) -> int:
    return train.cli([*map(str, args)])


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMINGS} for row in rows]


def assert_same_run(folder: Path, reference: Path) -> None:
    mine, theirs = load_weights(folder), load_weights(reference)
    assert mine["epoch"] == theirs["epoch"] and mine["iteration"] == theirs["iteration"]
    assert mine["config"] == theirs["config"] and mine["recipe"] == theirs["recipe"]
    assert mine["model"].keys() == theirs["model"].keys()
    for key, tensor in theirs["model"].items():  # weights, running statistics, num_batches_tracked
        assert torch.equal(mine["model"][key], tensor), key
    states = zip(mine["optimizer"]["state"].values(), theirs["optimizer"]["state"].values(), strict=True)
    for state, reference_state in states:
        assert torch.equal(state["momentum_buffer"], reference_state["momentum_buffer"])
    assert metrics(folder) == metrics(reference)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("network", list(NETWORKS))
def test_packed_runs_are_bit_identical_to_runs_alone(data_dir, tmp_path, network, fused):
    args = [*TINY, *NETWORKS[network], *SCHEDULE, "--data-dir", data_dir, "--fused" if fused else "--no-fused"]
    if network == "wide" and not fused:
        args += ["--dropout", "0.3"]  # each packed run draws its dropout masks from its own generator state
    seeds = (0, 1) if fused else (0, 1, 2)  # the interpreted kernels take seconds a step: two runs packed
    for seed in seeds:
        assert train_cli(*args, "--seed", seed, "--out", tmp_path / f"alone-{seed}") == 0
    assert train_cli(*args, "--seeds", ",".join(map(str, seeds)), "--out", tmp_path / "packed") == 0
    for seed in seeds:
        assert_same_run(tmp_path / "packed" / f"seed-{seed}", tmp_path / f"alone-{seed}")
    # 2 steps an epoch, fused too: the warm-up's end (after step 1) falls inside epoch 1
    assert load_weights(tmp_path / "packed" / "seed-0")["iteration"] == 4
    lrs = [row["lr"] for row in metrics(tmp_path / "packed" / "seed-0")]
    assert len(set(lrs)) == 2 and 0.02 not in lrs  # the epochs' last lrs: past the warm-up, then the decay


def test_a_grid_over_lr_and_weight_decay_with_its_summary(data_dir, tmp_path, capsys):
    args = [*TINY, *NETWORKS["normal"], *SCHEDULE, "--data-dir", data_dir]
    assert train_cli(*args, "--seeds", "3,4", "--lr", "0.1,0.05", "--weight-decay", "5e-4",
                     "--out", tmp_path / "grid") == 0
    folders = sorted(path.name for path in (tmp_path / "grid").iterdir() if path.is_dir())
    assert folders == ["lr-0.05-seed-3", "lr-0.05-seed-4", "lr-0.1-seed-3", "lr-0.1-seed-4"]
    assert train_cli(*args, "--seed", "4", "--lr", "0.05", "--weight-decay", "5e-4", "--out", tmp_path / "alone") == 0
    assert_same_run(tmp_path / "grid" / "lr-0.05-seed-4", tmp_path / "alone")
    config = json.loads((tmp_path / "grid" / "lr-0.05-seed-3" / "config.json").read_text())
    assert config["seed"] == 3 and config["recipe"]["lr"] == 0.05 and config["recipe"]["weight_decay"] == 5e-4

    summary = json.loads((tmp_path / "grid" / SUMMARY_NAME).read_text())
    assert [run["name"] for run in summary["runs"]] == ["lr-0.1-seed-3", "lr-0.1-seed-4", "lr-0.05-seed-3",
                                                       "lr-0.05-seed-4"]
    assert all(run["status"] == "finished" and run["epochs_done"] == 2 for run in summary["runs"])
    for group in summary["groups"]:
        errors = [json.loads((tmp_path / "grid" / name / "metrics.jsonl").read_text().splitlines()[-1])["test_error"]
                  for name in group["runs"]]
        assert group["test_error"] == seed_statistics(errors) and group["finished"] == 2
    printed = capsys.readouterr().out
    assert "lr 0.05, weight decay 0.0005: mean" in printed and "(2 of 2 runs finished)" in printed


def test_packed_runs_record_one_command(data_dir, tmp_path, monkeypatch):
    """Each packed run's commands.jsonl names the command by the process's start and pid, the same in
    all of them (a results table counts one command's side-by-side runs once), however long the runs
    take to set up: here a clock that moves on every time it is read."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(provenance.time, "strftime", lambda *args: f"2026-12-07 10:00:{next(ticks):02d} UTC")
    args = [*TINY, *NETWORKS["normal"], *SCHEDULE, "--data-dir", data_dir]
    assert train_cli(*args, "--seeds", "0,1,2", "--out", tmp_path / "packed") == 0
    records = [provenance.read_commands(tmp_path / "packed" / f"seed-{seed}") for seed in (0, 1, 2)]
    assert all(len(record) == 1 for record in records)
    assert len({(record[0]["started"], record[0]["pid"]) for record in records}) == 1


def test_seed_statistics():
    stats = seed_statistics([0.07, 0.05, 0.06])
    assert stats["mean"] == pytest.approx(0.06) and stats["median"] == 0.06
    assert stats["std"] == pytest.approx(0.01) and (stats["min"], stats["max"], stats["runs"]) == (0.05, 0.07, 3)
    assert seed_statistics([0.1])["std"] is None and seed_statistics([]) is None


@pytest.mark.parametrize("statuses, expected", [
    (["in progress"], "lr 0.1, weight decay 0.0001: no run finished yet (1 run)"),
    (["in progress", "in progress"], "no run finished yet (2 runs)"),
    (["finished"], "(1 of 1 run finished)"),
    (["finished", "in progress", "finished"], "(2 of 3 runs finished)"),
])
def test_summary_table_counts_runs_in_words(statuses, expected):
    runs = [{"name": f"seed-{seed}", "status": status, "epochs_done": 164 if status == "finished" else 80,
             "epochs": 164, "final_test_error": 0.08 if status == "finished" else None,
             "recipe_lr": 0.1, "recipe_weight_decay": 1e-4} for seed, status in enumerate(statuses)]
    finished = [run["final_test_error"] for run in runs if run["status"] == "finished"]
    summary = {"runs": runs, "groups": [{"lr": None, "weight_decay": None, "runs": [run["name"] for run in runs],
                                         "finished": len(finished), "test_error": seed_statistics(finished)}]}
    assert summary_table(summary).splitlines()[-1].endswith(expected)


def test_a_run_that_diverges_stops_alone_and_is_not_resumed(data_dir, tmp_path, capsys):
    """lr 1e30 overflows after the warm-up, in epoch 2: that run keeps its epoch-1 checkpoint and a
    record of why it stopped; the other runs finish; the command's status is 1."""
    out = tmp_path / "grid"
    args = [*TINY, *NETWORKS["normal"], *SCHEDULE, "--warmup-iters", "2", "--milestones", "2", "--data-dir", data_dir]
    assert train_cli(*args, "--seeds", "0,1", "--lr", "0.1,1e30", "--out", out) == 1
    err = capsys.readouterr().err
    assert "lr-1e+30-seed-0: stopped: the training loss became" in err and "the other runs go on" in err
    summary = json.loads((out / SUMMARY_NAME).read_text())
    status = {run["name"]: run["status"] for run in summary["runs"]}
    assert status == {"lr-0.1-seed-0": "finished", "lr-0.1-seed-1": "finished", "lr-1e+30-seed-0": "diverged",
                      "lr-1e+30-seed-1": "diverged"}
    diverged = out / "lr-1e+30-seed-0"
    assert "epoch 2" in json.loads((diverged / DIVERGED_NAME).read_text())["message"]
    saved = load_weights(diverged)
    assert saved["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert summary["groups"][0]["test_error"]["runs"] == 2 and summary["groups"][1]["test_error"] is None

    # the same command again: the finished runs are done, the diverged ones are not retried
    assert train_cli(*args, "--seeds", "0,1", "--lr", "0.1,1e30", "--resume", "auto", "--out", out) == 1
    assert "lr-1e+30-seed-0: its loss stopped being finite in an earlier command" in capsys.readouterr().err
    assert load_weights(diverged)["epoch"] == 1


@pytest.mark.parametrize("args, fragments", [
    (["--seeds", "0,1", "--seed", "2"], ["--seed and --seeds: give one"]),
    (["--seeds", "0,0"], ["--seeds", "distinct"]),
    (["--seeds", "0,x"], ["--seeds", "comma-separated seeds"]),
    (["--lr", "0.1,abc"], ["--lr", "comma-separated numbers"]),
    (["--seeds", "0,1", "--fused", "--type", "wide", "--dropout", "0.3"], ["dropout"]),
])
def test_impossible_combinations_are_refused_with_one_line(data_dir, tmp_path, args, fragments):
    result = run("train.py", *TINY, *NETWORKS["normal"], "--batch-size", "2", *args, "--data-dir", data_dir,
                 "--out", tmp_path / "x")
    assert_one_line_error(result, *fragments)


def test_packing_under_torchrun_is_refused_with_one_line(data_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *TINY, *NETWORKS["normal"], "--seeds", "0,1", "--data-dir",
                             str(data_dir), "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode != 0  # torchrun reports its processes' status 2 as a failure, with its own traceback
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert lines and all("cannot run under torchrun" in line for line in lines)
    assert f'File "{ROOT / "train.py"}"' not in result.stderr  # no traceback of train.py's own
    assert not (tmp_path / "x").exists()
