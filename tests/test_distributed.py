"""train.py under torchrun with 2 CPU processes (gloo), against the single-process run.

The loaders give every rank its slice of each global batch, so with synchronised BatchNorm a
2-process run computes what a 1-process run with the same global batch computes, up to float
summation order.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.test_cli import ROOT, TINY, load_weights, make_dataset, run


def torchrun(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PRERESNET_CHECK_REPLICAS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


# NCHW: oneDNN's channels-last convolutions (the CPU default) sum a batch of 16 and two of 8 in
# orders that differ by more than the 1e-4 the comparison allows after 2 epochs
SYNC_BN_RUN = [*TINY, "--epochs", "2", "--no-channels-last"]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=9)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run("train.py", *SYNC_BN_RUN, "--data-dir", data_dir, "--out", out, check=True)
    return out


def test_two_processes_with_sync_bn_match_one_process(data_dir, single, tmp_path):
    out = tmp_path / "two"
    result = torchrun(*SYNC_BN_RUN, "--data-dir", data_dir, "--sync-bn", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["runtime"]["processes"] == 2
    # replicas were compared after every step (PRERESNET_CHECK_REPLICAS=1), so ranks never diverged
    assert max_difference(load_weights(out)["model"], load_weights(single)["model"]) < 1e-4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_images"] for m in lines] == [36, 36]  # every test image once, split over the ranks
    assert [m["processes"] for m in lines] == [2, 2]
    for mine, theirs in zip(lines, reference):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["test_error"] == pytest.approx(theirs["test_error"], abs=1 / 36 + 1e-9)

    # a 2-rank checkpoint resumes on 1 rank
    resumed = run("train.py", "--resume", out, "--epochs", "3", "--no-progress", check=True)
    assert "resuming after epoch 2" in resumed.stderr
    final = load_weights(out)
    assert final["epoch"] == 3
    assert json.loads((out / "config.json").read_text())["runtime"]["processes"] == 1


@pytest.fixture(scope="module")
def per_process(data_dir, tmp_path_factory):
    """2 processes, fp32, eager, each normalising with its own half of the batch (the default)."""
    out = tmp_path_factory.mktemp("per-process") / "run"
    result = torchrun(*TINY, "--data-dir", data_dir, "--epochs", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_per_process_statistics_by_default(per_process, single):
    # the ranks stay identical, but each normalised with its own half-batch: not the 1-process run
    # (measured 0.098, in the running variance)
    assert max_difference(load_weights(per_process)["model"], load_weights(single)["model"]) > 1e-2


def test_compile_amp_and_channels_last_under_ddp(data_dir, per_process, tmp_path):
    """torch.compile of the DDP-wrapped model, bf16 autocast and channels-last together stay within
    bf16 rounding of the eager fp32 2-process run (measured 2.3e-3; a run that mixed up the two
    processes' statistics or batches lands 0.1 away)."""
    out = tmp_path / "compiled"
    result = torchrun(*TINY, "--data-dir", data_dir, "--epochs", "2", "--compile", "--amp", "bf16", "--channels-last",
                      "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = json.loads((out / "config.json").read_text())["runtime"]
    assert (runtime["compile"], runtime["amp"], runtime["channels_last"], runtime["processes"]) == (True, "bf16", True, 2)
    assert "_broadcast_coalesced" not in result.stderr  # the known, harmless graph-break warning is filtered
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (per_process / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_images"] for m in lines] == [36, 36]
    for mine, theirs in zip(lines, reference, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=5e-3)
    assert max_difference(load_weights(out)["model"], load_weights(per_process)["model"]) < 1.5e-2


def test_fused_kernels_synchronise_statistics(tmp_path):
    tiny = make_dataset(tmp_path / "tiny", train_per_class=1, test_per_class=1)
    for name, launch in (("one", run), ("two", torchrun)):
        result = launch("train.py", *TINY, "--data-dir", tiny, "--epochs", "1", "--batch-size", "4", "--fused",
                        "--sync-bn", "--warmup-iters", "0", "--out", tmp_path / name) if name == "one" else \
            launch(*TINY, "--data-dir", tiny, "--epochs", "1", "--batch-size", "4", "--fused", "--sync-bn",
                   "--warmup-iters", "0", "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
    assert max_difference(load_weights(tmp_path / "two")["model"], load_weights(tmp_path / "one")["model"]) < 1e-4


def test_an_error_stops_every_rank(data_dir, tmp_path):
    result = torchrun(*TINY, "--data-dir", data_dir, "--batch-size", "15", "--out", tmp_path / "odd", timeout=120)
    assert result.returncode != 0
    assert "does not split evenly over 2 processes" in result.stderr


@pytest.mark.parametrize("fails", [False, True])
def test_ranks_leave_together_after_training(monkeypatch, fails):
    """After a run every rank waits for the others (rank 0 writes the last checkpoint) before it tears down
    the process group; on the way out of an error it does not wait, as the other ranks may never come."""
    from preresnet import distributed, train_cli

    calls = []

    def train(args, dist, command):
        calls.append("train")
        if fails:
            raise RuntimeError("failed")
        return {"status": "finished"}

    monkeypatch.setattr(distributed, "init", lambda device: calls.append("init") or distributed.Dist(1, 2, 1))
    monkeypatch.setattr(distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(train_cli, "train", train)
    args = train_cli.build_parser().parse_args(["--device", "cpu"])
    if fails:
        with pytest.raises(RuntimeError):
            train_cli.main(args)
    else:
        assert train_cli.main(args) == {"status": "finished"}
    assert calls == (["init", "train", "shutdown"] if fails else ["init", "train", "barrier", "shutdown"])
