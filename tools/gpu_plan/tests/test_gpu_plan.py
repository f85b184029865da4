"""The staged GPU plan (tools/gpu_plan), dry-run on the CPU: every stage end to end with a tiny
network and stand-ins for the GPU-only parts, so a GPU window never finds a crash the CPU could
have shown; the results table and eval.py on a finished run's exported weights."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import render_results
from bench.workloads import VARIANT_FLAGS
from preresnet import sweeps
from preresnet import train_cli as train
from tools.gpu_plan import plan as gpu_plan
from tools.gpu_plan.common import kernels_digest
from tools.gpu_plan.first_contact import newest_choice
from tools.gpu_plan.matrix import MATRIX_VARIANTS
from tools.gpu_plan.reproduce import DATA_DESCRIPTION, copying_progress, row_seeds, wall_seconds

ROOT = Path(__file__).resolve().parents[3]


def plan(*args, timeout=300, out=None) -> subprocess.CompletedProcess:
    """python -m tools.gpu_plan ARGS; out: as on the GPU machine, with $OUT the folder that comes back."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, "-m", "tools.gpu_plan", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_first_contact_dry_run(tmp_path):
    result = plan("first-contact", "--dry-run", "--results", tmp_path / "results", "--work", tmp_path / "work")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "STAND-IN" in result.stdout and "Traceback" not in result.stdout + result.stderr
    [folder] = (tmp_path / "results").iterdir()
    assert folder.name.endswith("-cpu-dry-run")
    report = json.loads((folder / "report.json").read_text())
    assert report["dry_run"] and not report["passed"]  # a dry run never counts as passed
    assert [p["name"] for p in report["parts"]] == ["kernel-tests", "kernel-errors", "layer-paths", "config-search",
                                                    "speed-matrix", "packing"]
    assert report["kernels_digest"] == kernels_digest()
    rows = report["matrix"]["models"]
    assert [row["variant"] for row in rows] == list(MATRIX_VARIANTS)
    assert all(row["images_per_second"] > 0 and row.get("correct") for row in rows), rows
    # the graph variants ran the capturable step (no capture on a CPU), the others the plain one
    assert all(("without capture" in row["step"]) == VARIANT_FLAGS[row["variant"]]["cuda_graphs"]
               for row in rows if row["variant"] != "compile-reduce-overhead")
    assert "## Training step of train.py" in (folder / "report.md").read_text()
    # packing: 1 and 2 packed copies of the tiny network in its fastest correct variant, and the choice
    packing = report["packing"]["tiny"]
    assert [row["runs"] for row in packing["rows"]] == [1, 2] and packing["variant"] == report["choice"]["variant"]
    assert all(row["images_per_second"] > 0 for row in packing["rows"]) and packing["choice"] in (1, 2)
    assert "## Packed runs (train.py --seeds)" in (folder / "report.md").read_text()
    # the choice is a set of train.py flags train.py accepts
    args = train.build_parser().parse_args(["--type", "normal", "--depth", "1", *report["choice"]["flags"]])
    assert args.cuda_graphs is not None and args.compile is not None
    # the README's performance table reads the report as it reads bench.gpu_report's
    table = render_results.table(render_results.load_reports(tmp_path / "results"))
    assert "| tiny | compile-graphs |" in table
    # a second command on the same (warm) machine keeps what the first measured
    again = plan("first-contact", "--dry-run", "--results", tmp_path / "again", "--work", tmp_path / "work")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "continuing the first-contact of an earlier command" in again.stdout
    assert "matrix tiny" not in again.stdout and "packing tiny" not in again.stdout  # nothing left to measure
    [folder] = (tmp_path / "again").iterdir()
    assert [row["variant"] for row in json.loads((folder / "report.json").read_text())["matrix"]["models"]] == \
        list(MATRIX_VARIANTS)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """reproduce --dry-run (3 seeds, packed) as two GPU-machine commands: the first, cut short by its
    time limit after one epoch, returns its results bundled in $OUT, unpacked here into a
    checkout; the second, on a 'fresh machine' (the work folder deleted), resumes every seed from
    the returned checkpoints to the end."""
    root = tmp_path_factory.mktemp("plan")
    checkout, work, out = root / "checkout", root / "work", root / "out"
    out.mkdir()
    # the synthetic data, whatever archive the checkout's data/ holds
    synthetic = ("--data-archive", root / "no-archive.tar.gz")
    first = plan("reproduce", "--dry-run", "--work", work, "--train-seconds", "1", *synthetic, out=out)
    returned = [(path.name, path.is_file(), path.stat().st_size) for path in out.iterdir()]
    unpacked = plan("unpack", out, "--into", checkout)
    results = checkout / "bench" / "results"
    run_dir = results / "reproduce" / "dryrun-preresnet110"
    state = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else None
    had_checkpoints = all((run_dir / f"seed-{seed}" / "checkpoint.pt").is_file() for seed in (0, 1, 2))
    shutil.rmtree(work / "runs")
    second = plan("reproduce", "--dry-run", "--results", results, "--work", work, *synthetic)
    return first, returned, unpacked, state, had_checkpoints, second, run_dir


def test_reproduce_dry_run_stops_in_time_and_resumes_from_the_returned_checkpoint(reproduced):
    first, returned, unpacked, state, had_checkpoints, second, run_dir = reproduced
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "STAND-IN" in first.stdout and "3 runs packed: seed-0, seed-1, seed-2" in first.stdout
    assert "stopping before epoch 2 of 3" in first.stdout and "stopped by --time-limit" in first.stdout
    # what a GPU machine brings back: a few files at the top of $OUT, unpacked over the checkout here
    assert 2 <= len(returned) <= 8 and all(is_file and size <= 16 * 2**20 for _, is_file, size in returned), returned
    assert unpacked.returncode == 0, unpacked.stderr
    assert state["epochs_done"] == 1 and not state["finished"] and state["seeds"] == [0, 1, 2] and had_checkpoints
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "seed-2: continuing from" in second.stdout and "seed-2: resuming after epoch 1" in second.stdout
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 3 and len(summary["commands"]) == 2
    assert (run_dir / "train.log").is_file()
    for folder, run in summary["runs"].items():
        metrics = [json.loads(line) for line in (run_dir / folder / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2, 3]
        assert "compile_seconds" in metrics[0] and "compile_seconds" in metrics[1]  # each command's first epoch
        assert run["final_test_error"] == metrics[-1]["test_error"]
        # each command's own record, the last one as train.py finished it (not as of an earlier checkpoint)
        records = [json.loads(line) for line in (run_dir / folder / "commands.jsonl").read_text().splitlines()]
        assert [record["epochs"] for record in records] == [[1, 1], [2, 3]]
        for name in ("config.json", "curves.png"):
            assert (run_dir / folder / name).is_file(), name
        assert not (run_dir / folder / "checkpoint.pt").exists()  # finished: the registry entry holds the weights
        # the stage exported the final weights and measured the file (bf16 parameters: an image may flip)
        assert run["weights"]["entry"] == f"preresnet8-synthetic-paper-cpu-s{folder.split('-')[1]}"
        assert run["weights"]["test_error"] == pytest.approx(run["final_test_error"], abs=0.1)


def test_eval_reads_the_exported_weights_and_train_refuses_to_resume_them(reproduced):
    *_, run_dir = reproduced
    registry = run_dir.parents[1] / "weights"  # a dry run's entries stay in its results root
    run = json.loads((run_dir / "run.json").read_text())["runs"]["seed-0"]
    entry = run["weights"]["entry"]
    meta = json.loads((registry / f"{entry}.json").read_text())
    assert meta["data"]["description"] == "synthetic (dry run)" and meta["test_error"] == run["weights"]["test_error"]
    assert meta["training_test_error"] == run["final_test_error"]
    assert meta["commands"]["reproduce"] == "python -m tools.gpu_plan reproduce --dry-run --seeds 0"
    assert not (ROOT / "preresnet" / "weights" / f"{entry}.json").exists()  # never in the package's registry
    weights = registry / meta["file"]
    state = torch.load(weights, map_location="cpu", weights_only=True)  # a plain state_dict
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state["conv1.weight"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in state.items() if "running_" in k)
    env = {**os.environ, "PRERESNET_WEIGHTS_DIR": str(registry)}
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--weights", entry, "--json", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test_error"] == meta["test_error"]
    assert (registry / f"{entry}.md").is_file() and (registry / meta["curves"]).is_file()
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(weights)], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2 and "holds bare weights" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_seeds_added_to_a_finished_row_train_alone_and_the_row_pools_them(reproduced, tmp_path):
    """A finished 3-seed row grown by a fourth seed on a fresh machine (no run folders, no
    checkpoints: the finished seeds live on as records and weights entries): only the new seed
    trains, the finished seeds' records and files stay as they were, the row's statistics cover
    all four, a note written into run.json by hand survives; --seeds may not drop a seed."""
    *_, run_dir = reproduced
    results = tmp_path / "results"
    shutil.copytree(run_dir.parents[1], results)
    row = results / "reproduce" / run_dir.name
    before = json.loads((row / "run.json").read_text())
    # a command of an older commit, written by hand like the note
    earlier = {**before["commands"][0], "commit": "abc1234"}
    (row / "run.json").write_text(json.dumps({**before, "record_notes": ["written by hand"],
                                              "commands": [earlier, *before["commands"][1:]]}))
    metrics_before = {seed: (row / f"seed-{seed}" / "metrics.jsonl").read_text() for seed in (0, 1, 2)}
    synthetic = ("--data-archive", tmp_path / "no-archive.tar.gz")

    dropped = plan("reproduce", "--dry-run", "--seeds", "1,5", "--results", results, "--work", tmp_path / "work", *synthetic)
    assert dropped.returncode == 2 and "would drop [0, 2]" in dropped.stderr, dropped.stderr
    grown = plan("reproduce", "--dry-run", "--seeds", "0,1,2,3", "--results", results, "--work", tmp_path / "work",
                 *synthetic)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "seeds [0, 1, 2] finished and kept; training seeds [3]" in grown.stdout
    assert "seed-3: starting" in grown.stdout and "seed-0: starting" not in grown.stdout
    summary = json.loads((row / "run.json").read_text())
    assert summary["seeds"] == [0, 1, 2, 3] and summary["finished"] and summary["epochs_done"] == 3
    assert {name: summary["runs"][name] for name in before["runs"]} == before["runs"]  # kept as they were
    assert all((row / f"seed-{seed}" / "metrics.jsonl").read_text() == metrics_before[seed] for seed in (0, 1, 2))
    assert summary["runs"]["seed-3"]["weights"]["entry"] == "preresnet8-synthetic-paper-cpu-s3"
    errors = [summary["runs"][f"seed-{seed}"]["final_test_error"] for seed in range(4)]
    assert summary["test_error"] == sweeps.seed_statistics(errors) and summary["test_error"]["runs"] == 4
    assert summary["record_notes"] == ["written by hand"] and len(summary["commands"]) == 3
    assert summary["commands"][-1]["epochs_after"] == {"seed-3": 3}
    assert summary["commit"] == ["abc1234", *dict.fromkeys(c["commit"] for c in summary["commands"][1:])]
    [command] = summary["commands"][-1]["commands"]
    assert " --seeds 3 " in command
    again = plan("reproduce", "--dry-run", "--seeds", "3,0,1,2", "--results", results, "--work", tmp_path / "work",
                 *synthetic)
    assert again.returncode == 0 and "finished: nothing to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    # a weights card's command names its own seed: finished, so nothing to do (not an error)
    card = plan("reproduce", "--dry-run", "--seeds", "1", "--results", results, "--work", tmp_path / "work", *synthetic)
    assert card.returncode == 0 and "seeds [1] are finished: nothing to do" in card.stdout, card.stdout + card.stderr
    assert json.loads((row / "run.json").read_text()) == summary


def test_row_seeds_may_grow_but_never_lose_a_seed():
    assert row_seeds(None, None) == [0, 1, 2] and row_seeds(None, [4]) == [4]
    assert row_seeds([0], None) == [0] and row_seeds([0], [0, 1, 2]) == [0, 1, 2]
    assert row_seeds([0], [2, 1, 0, 2]) == [0, 2, 1]  # the recorded seeds first, then the added ones as given
    with pytest.raises(ValueError, match=r"would drop \[0\]"):
        row_seeds([0, 1], [1, 2])


def test_wall_time_is_unknown_when_a_command_left_no_record():
    assert wall_seconds([{"seconds": 10.0}, {"seconds": 5.25}]) == {"wall_seconds": 15.2}
    assert wall_seconds([{"seconds": 10.0}, {"seconds": None}]) == {"wall_seconds": None, "wall_seconds_known": 10.0}


def fake_run(folder: Path, finished: bool) -> None:
    errors = {"seed-0": 0.0712, "seed-1": 0.0701, "seed-2": 0.0690}
    runs = {name: {"epochs_done": 164 if finished else 80, "finished": finished, "images_per_second": 13_000.0,
                   "final_test_error": error if finished else None,
                   "weights": {"entry": f"preresnet110-cifar10jpeg-paper-gpu-s{name[-1]}", "test_error": error + 1e-4}
                   if finished else {}}
            for name, error in errors.items()}
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "name": folder.name, "model": "preresnet110", "network": "PreResNet-110", "recipe": "paper",
        "data": DATA_DESCRIPTION, "epochs": 164, "seeds": [0, 1, 2], "epochs_done": 164 if finished else 80,
        "finished": finished, "runs": runs,
        "test_error": sweeps.seed_statistics(list(errors.values())) if finished else None,
        "paper_test_error": 0.0637, "wall_seconds": 1500.0, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
        "triton": "3.6.0", "commit": "abc1234", "commands": [{}, {}]}))
    for index, name in enumerate(runs):  # the seeds train side by side: the slowest one's steps make the time
        (folder / name).mkdir()
        epochs = [{"epoch": epoch, "epoch_seconds": 9.0 + index, "train_seconds": 8.0 + index,
                   "images_per_second": 49_920 / (8.0 + index)} for epoch in range(1, runs[name]["epochs_done"] + 1)]
        (folder / name / "metrics.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in epochs))
        # two commands trained each seed; the second's commit is unknown (a command that left no record)
        commands = [{"commit": "abc1234", "epochs": [1, 50]}, {"commit": None, "epochs": [51, 80]}]
        (folder / name / "commands.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in commands))


def test_results_table_shows_the_spread_over_seeds_and_names_unfinished_runs(tmp_path):
    fake_run(tmp_path / "reproduce" / "preresnet110-paper-cifar10-jpeg", finished=True)
    fake_run(tmp_path / "reproduce" / "preresnet164-paper-cifar10-jpeg", finished=False)
    runs = render_results.load_runs(tmp_path)
    text = render_results.runs_table(runs)
    assert ("| PreResNet-110 | paper | CIFAR-10 re-encoded as JPEG (lossy; not the papers' data) | **7.01%** ± 0.11% "
            "(s0 7.12%, s1 7.01%, s2 6.90%) | 3 | 6.37% | 27.3 min | 5,593 | NVIDIA H100 80GB HBM3 | "
            "2.11.0 / 3.6.0 | abc1234, unknown | `preresnet110-cifar10jpeg-paper-gpu-s0` (7.13% as stored), "
            "`preresnet110-cifar10jpeg-paper-gpu-s1` (7.02% as stored), `preresnet110-cifar10jpeg-paper-gpu-s2` "
            "(6.91% as stored) |") in text
    assert ("In progress: PreResNet-110 (paper, 3 seeds, NVIDIA H100 80GB HBM3), 80 of 164 epochs after 13.3 min of "
            "training") in text
    readme = f"a\n{render_results.RUNS_START}\nold\n{render_results.RUNS_END}\nb\n"
    assert render_results.render_runs(readme, runs) == f"a\n{render_results.RUNS_START}\n{text}\n{render_results.RUNS_END}\nb\n"
    assert "No finished reproduction run yet" in render_results.runs_table([])


def test_a_row_grown_by_seeds_counts_each_command_once_and_names_each_seed_precision(tmp_path):
    """Seed 0 trained alone in fp32 (two commands, one without a record), seeds 1 and 2 packed in
    bf16 later (one command, side by side): the row's training time is seed 0's two commands plus
    the slower of the packed pair, and each seed's precision is shown."""
    folder = tmp_path / "reproduce" / "preresnet20-paper-cifar10-jpeg-cpu"
    fake_run(folder, finished=True)
    packed = {"started": "2026-12-04 01:00:00 UTC", "pid": 42, "commit": "def5678", "amp": "bf16", "epochs": [1, 164],
              "device": "CPU (AMD EPYC)"}
    for seed, records in (("seed-0", [{"commit": "abc1234", "amp": "off", "epochs": [1, 80],
                                       "started": "2026-12-01 01:00:00 UTC", "pid": 7, "device": "CPU (Intel Xeon)"},
                                      {"commit": None, "amp": "off", "epochs": [81, 164]}]),
                          ("seed-1", [packed]), ("seed-2", [packed])):
        (folder / seed / "commands.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    [run] = render_results.load_runs(tmp_path)
    # seed 0: 164 epochs of 8 s; seeds 1 and 2 side by side: 164 of 10 s (the slower)
    assert run["training_seconds"] == pytest.approx(164 * 8.0 + 164 * 10.0)
    assert run["precision"] == {"seed-0": "fp32", "seed-1": "bf16", "seed-2": "bf16"}
    assert "(s0 7.12% fp32, s1 7.01% bf16, s2 6.90% bf16)" in render_results.runs_table([run])
    assert run["commits"] == ["abc1234", None, "def5678"]
    # the machines come from the commands, in the order they first trained, not from run.json's newest one
    assert run["devices"] == ["CPU (Intel Xeon)", "CPU (AMD EPYC)"]
    assert "| CPU (Intel Xeon), then CPU (AMD EPYC) | 2.11.0 / 3.6.0 |" in render_results.runs_table([run])
    (folder / "seed-1" / "commands.jsonl").write_text(json.dumps({**packed, "amp": "off"}) + "\n" +
                                                      json.dumps({**packed, "pid": 43}) + "\n")
    assert render_results.load_runs(tmp_path)[0]["precision"]["seed-1"] == "fp32, then bf16"


def test_seeds_added_to_a_finished_row_train_beside_it_and_leave_the_row_as_it_was(tmp_path):
    """A finished one-seed row grown by seeds 1 and 2 (run.json unfinished while they train): the
    row stays exactly the one-seed row it was, and a line below it names the seeds still training,
    their epochs and their own training time -- one packed command, though its runs' records were
    stamped a second apart (train.py before one start per process)."""
    alone = tmp_path / "alone" / "reproduce" / "preresnet110-paper-cifar10-jpeg"
    grown = tmp_path / "grown" / "reproduce" / "preresnet110-paper-cifar10-jpeg"
    for folder in (alone, grown):
        fake_run(folder, finished=True)
    summary = json.loads((alone / "run.json").read_text())
    summary.update(seeds=[0], runs={"seed-0": summary["runs"]["seed-0"]})
    summary["test_error"] = sweeps.seed_statistics([summary["runs"]["seed-0"]["final_test_error"]])
    (alone / "run.json").write_text(json.dumps(summary))
    for seed in ("seed-1", "seed-2"):
        shutil.rmtree(alone / seed)
    training = {"epochs_done": 40, "finished": False, "final_test_error": None, "weights": {}}
    summary = json.loads((grown / "run.json").read_text())
    summary.update(finished=False, test_error=None, epochs_done=40,
                   runs={**summary["runs"], "seed-1": training, "seed-2": training})
    (grown / "run.json").write_text(json.dumps(summary))
    for seed, started in (("seed-1", "2026-12-06 19:49:29 UTC"), ("seed-2", "2026-12-06 19:49:30 UTC")):
        lines = (grown / seed / "metrics.jsonl").read_text().splitlines()[:40]
        (grown / seed / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
        (grown / seed / "commands.jsonl").write_text(json.dumps(
            {"started": started, "pid": 3935, "commit": "d1a5c0a", "amp": "bf16", "epochs": [1, 40],
             "device": "CPU (AMD EPYC)"}) + "\n")
    [row_alone] = render_results.load_runs(tmp_path / "alone")
    [row_grown] = render_results.load_runs(tmp_path / "grown")
    table_alone = render_results.runs_table([row_alone]).splitlines()
    table_grown = render_results.runs_table([row_grown]).splitlines()
    assert "| **7.12%** (s0 7.12%) | 1 | 6.37% |" in table_alone[2]
    assert table_grown[:3] == table_alone  # the header and the finished row, as they were
    # seeds 1 and 2 packed: 40 epochs of the slower one's 10 s (not 40 of 9 s plus 40 of 10 s)
    assert table_grown[3:] == ["", "In progress: PreResNet-110 (paper), seeds 1 and 2 (CPU (AMD EPYC)), 40 of 164 "
                               "epochs after 6.7 min of training; they join the row's finished seed 0 when they "
                               f"finish (`{row_grown['path']}`)."]
    assert render_results.row_statistics(row_grown) == render_results.row_statistics(row_alone)
    assert render_results.row_statistics(row_alone)["runs"] == 1


def test_records_of_one_process_started_within_a_minute_are_one_command():
    records = [{"pid": 7, "started": "2026-12-06 19:49:29 UTC"}, {"pid": 7, "started": "2026-12-06 19:49:31 UTC"},
               {"pid": 7, "started": "2026-12-06 23:00:00 UTC"}, {"pid": 8, "started": "2026-12-06 19:49:30 UTC"},
               {"pid": 9, "started": "2026-12-03 15:06 UTC"}, {"started": "2026-12-06 19:49:29 UTC"}]
    keys = render_results.command_keys(records)
    assert keys[7, "2026-12-06 19:49:31 UTC"] == keys[7, "2026-12-06 19:49:29 UTC"]
    assert len(set(keys.values())) == 4 and len(keys) == 5  # pid 7 twice, pid 8, pid 9; no pid: no key


def test_next_follows_the_documented_order(tmp_path):
    assert gpu_plan.next_stage([tmp_path])[0] == "first-contact"
    report = tmp_path / "2026-12-01-h100" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"stage": "first-contact", "passed": True, "kernels_digest": "old"}))
    assert gpu_plan.next_stage([tmp_path])[0] == "first-contact"  # passed on other kernels
    report.write_text(json.dumps({"stage": "first-contact", "passed": True, "kernels_digest": kernels_digest()}))
    assert gpu_plan.next_stage([tmp_path])[0] == "reproduce --model preresnet110"
    fake_run(tmp_path / "reproduce" / "preresnet110-paper-cifar10-jpeg", finished=True)
    assert gpu_plan.next_stage([tmp_path])[0] == "reproduce --model preresnet164"
    for name in ("preresnet164-paper-cifar10-jpeg", "wrn16_4-wrn-cifar10-jpeg"):
        fake_run(tmp_path / "reproduce" / name, finished=True)
    assert gpu_plan.next_stage([tmp_path])[0] == "none"


def test_documented_stage_commands_parse():
    """Every `python[3] -m tools.gpu_plan ...` command in tools/gpu_plan/README.md is one the plan accepts."""
    text = (ROOT / "tools" / "gpu_plan" / "README.md").read_text()
    commands = re.findall(r"^python3? -m tools\.gpu_plan (.+)$", text, flags=re.MULTILINE)
    commands += re.findall(r"`python3? -m tools\.gpu_plan ([^`]+)`", text)
    assert any(c.startswith("first-contact") for c in commands) and any(c.startswith("reproduce") for c in commands)
    parser = gpu_plan.build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command.split("#")[0].replace("DIR", "/tmp/x")))


def test_reproduce_copies_each_new_checkpoint_back_while_training(tmp_path):
    """A command killed before its end still returns its last save: the watcher copies every new
    checkpoint (with metrics, config and curves) into the results folder while train.py runs."""
    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    with copying_progress(run, results, every=0.02):
        time.sleep(0.1)
        assert not (results / "checkpoint.pt").exists()  # nothing saved yet
        (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
        (run / "checkpoint.pt").write_bytes(b"epoch 1")
        deadline = time.monotonic() + 10
        while not (results / "checkpoint.pt").exists():
            assert time.monotonic() < deadline, "the checkpoint was not copied back"
            time.sleep(0.02)
    assert (results / "checkpoint.pt").read_bytes() == b"epoch 1"
    assert (results / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert not list(results.glob(".*.copy"))


def test_a_speed_choice_counts_only_on_the_current_kernels(tmp_path):
    report = tmp_path / "2026-12-01-h100" / "report.json"
    report.parent.mkdir()
    choice = {"variant": "fused-graphs", "flags": ["--fused"]}
    report.write_text(json.dumps({"stage": "first-contact", "passed": True, "choice": choice, "date": "2026-12-01",
                                  "kernels_digest": "other kernels"}))
    assert newest_choice([tmp_path]) is None
    report.write_text(json.dumps({"stage": "first-contact", "passed": True, "choice": choice, "date": "2026-12-01",
                                  "kernels_digest": kernels_digest()}))
    assert newest_choice([tmp_path]) == choice
