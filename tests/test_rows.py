"""A results row from train.py's run folder, end to end as a user makes one: train.py --seeds,
python -m preresnet.export, python -m bench.render_results --add; and what `auto` takes on a GPU
from the committed GPU reports (bench.render_results.gpu_defaults, preresnet.runtime)."""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from bench import render_results
from bench.rows import record_row
from preresnet import run_setup, runtime as runtime_module
from preresnet.errors import UserError
from preresnet.recipes import resolve_recipe
from preresnet.train_cli import build_parser
from tests.test_cli import ROOT, TINY, make_dataset, run

DATA = "four shapes (a synthetic folder)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two seeds of PreResNet-8 trained packed for 2 epochs by one train.py command, and seed 0
    exported into a registry of its own: what a user has before recording the row."""
    root = tmp_path_factory.mktemp("row")
    data_dir = make_dataset(root / "shapes")
    out = root / "runs" / "pr8"
    run("train.py", *TINY, "--epochs", "2", "--seeds", "0,1", "--out", out, data_dir=data_dir, check=True, timeout=600)
    registry = root / "weights"
    subprocess.run([sys.executable, "-m", "preresnet.export", str(out / "seed-0"), "--registry", str(registry),
                    "--name", "pr8-shapes-s0", "--data", DATA, "--data-dir", "data/shapes"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return out, registry


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_folder_becomes_a_row_with_its_weights(trained, tmp_path, monkeypatch):
    out, registry = trained
    monkeypatch.setenv("PRERESNET_WEIGHTS_DIR", str(registry))
    row = record_row(out, tmp_path)
    assert row.name == "preresnet-8-paper-shapes-cpu"  # no registry name: the paper name, lower case
    record = json.loads((row / "run.json").read_text())
    errors = {seed: metrics(out / seed)[-1]["test_error"] for seed in ("seed-0", "seed-1")}  # what training logged
    assert record["seeds"] == [0, 1] and record["finished"] and record["epochs_done"] == 2
    assert {seed: run["final_test_error"] for seed, run in record["runs"].items()} == errors
    assert record["test_error"]["mean"] == pytest.approx(statistics.mean(errors.values()))
    assert record["test_error"]["std"] == pytest.approx(statistics.stdev(errors.values()))
    assert record["data"] == DATA  # the words the weights entry was exported with
    exported = json.loads((registry / "pr8-shapes-s0.json").read_text())
    assert record["runs"]["seed-0"]["weights"] == {"entry": "pr8-shapes-s0", "file": exported["file"],
                                                   "test_error": exported["test_error"], "bytes": exported["bytes"]}
    assert "weights" not in record["runs"]["seed-1"]  # not exported
    assert record["paper_test_error"] is None  # four shapes are not CIFAR-10
    for seed in ("seed-0", "seed-1"):
        assert sorted(p.name for p in (row / seed).iterdir()) == ["commands.jsonl", "config.json", "curves.png",
                                                                   "metrics.jsonl"]  # finished: no checkpoint
    # the README's row, from the recorded files
    [loaded] = [r for r in render_results.load_runs(tmp_path)]
    line = render_results.runs_table([loaded]).splitlines()[2]
    assert "`pr8-shapes-s0`" in line and f"{100 * statistics.mean(errors.values()):.2f}%" in line


def test_an_unfinished_seed_travels_with_its_checkpoint_and_is_named_below_the_table(trained, tmp_path):
    out, _ = trained
    unfinished = tmp_path / "run"
    shutil.copytree(out / "seed-1", unfinished / "seed-1")
    config = json.loads((unfinished / "seed-1" / "config.json").read_text())
    config["recipe"]["epochs"] = 5  # the same files, as they are two epochs into five
    (unfinished / "seed-1" / "config.json").write_text(json.dumps(config))
    row = record_row(unfinished, tmp_path / "results", data=DATA)
    record = json.loads((row / "run.json").read_text())
    assert not record["finished"] and record["test_error"] is None
    assert record["runs"]["seed-1"] == {"epochs_done": 2, "finished": False, "final_test_error": None,
                                        "last_test_error": metrics(out / "seed-1")[-1]["test_error"]}
    assert (row / "seed-1" / "checkpoint.pt").read_bytes() == (out / "seed-1" / "checkpoint.pt").read_bytes()
    [loaded] = render_results.load_runs(tmp_path / "results")
    text = render_results.runs_table([loaded])
    assert text.startswith("No finished reproduction run yet") and "In progress: PreResNet-8" in text
    assert "2 of 5 epochs" in text


def test_a_folder_without_runs_or_with_two_networks_is_refused(trained, tmp_path):
    out, _ = trained
    with pytest.raises(UserError, match="holds no train.py run"):
        record_row(tmp_path, tmp_path / "results")
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    config = json.loads((mixed / "seed-1" / "config.json").read_text())
    config["recipe_name"] = "wrn"
    (mixed / "seed-1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="differ in recipe_name"):
        record_row(mixed, tmp_path / "results")


def test_the_cards_command_trains_what_the_config_recorded(trained):
    """The weights card's train.py command, parsed by train.py's own parser, gives back the run's
    network, recipe, seed and execution settings as its config.json recorded them."""
    out, registry = trained
    meta = json.loads((registry / "pr8-shapes-s0.json").read_text())
    config = json.loads((out / "seed-0" / "config.json").read_text())
    words = shlex.split(meta["commands"]["train"])
    assert words[:2] == ["python", "train.py"]
    args = build_parser().parse_args(words[2:])
    assert run_setup.network(args) == (config["type"], config["depth"], config["width"])
    recipe = resolve_recipe(args.recipe, **{name: getattr(args, name) for name in run_setup.RECIPE_FLAGS})
    assert json.loads(json.dumps(recipe.__dict__)) == config["recipe"]
    assert args.seed == config["seed"] and args.dataset == config["dataset"]
    recorded = config["runtime"]
    assert (args.amp, args.channels_last, args.compile, args.fused, args.cuda_graphs, args.loader) == (
        recorded["amp"], recorded["channels_last"], recorded["compile"], recorded["fused"], recorded["cuda_graphs"],
        recorded["loader"])


# --- what auto takes on a GPU ------------------------------------------------------------------------


def report(path: str, speeds: dict[str, float], tests_ok: bool = True, kernels_ok: bool = True) -> dict:
    """A GPU report on NVIDIA H200 whose matrix times each variant at speeds[variant] x 1000 images/s
    for every network."""
    rows = [{"model": model, "provider": provider, "images_per_second": 1000.0 * speed}
            for model in ("preresnet110", "preresnet164", "wrn16_4") for provider, speed in speeds.items()]
    return {"path": path, "date": "2027-01-05 10:00:00 UTC", "environment": {"gpu": "NVIDIA H200"},
            "tests": {"returncode": 0 if tests_ok else 1}, "correctness_pass": kernels_ok, "matrix": {"models": rows}}


@pytest.mark.parametrize("speeds, fused, graphs", [
    ({"compile": 1.0, "fused-compile": 1.3, "compile-graphs": 1.1, "fused-compile-graphs": 1.2}, True, False),
    ({"compile": 1.0, "fused-compile": 0.9, "compile-graphs": 1.2, "fused-compile-graphs": 1.1}, False, True),
    ({"compile": 1.0, "fused-compile": 1.0, "compile-graphs": 0.8}, False, False),  # a tie keeps the plain step
    ({"compile": 1.0, "fused-compile": 1.1, "compile-graphs": 1.2, "fused-compile-graphs": 1.4}, True, True),
])
def test_gpu_defaults_turn_on_only_the_fastest_correct_variant(speeds, fused, graphs):
    table = json.loads(render_results.gpu_defaults([report("bench/results/x/report.json", speeds)]))
    assert (table["NVIDIA H200"]["fused"]["on"], table["NVIDIA H200"]["cuda_graphs"]["on"]) == (fused, graphs)
    assert "bench/results/x/report.json" in table["NVIDIA H200"]["fused"]["reason"]


def test_gpu_defaults_ignore_reports_that_failed_or_did_not_time_the_plain_step():
    fast = {"compile": 1.0, "fused-compile": 2.0}
    assert json.loads(render_results.gpu_defaults([report("a", fast, tests_ok=False)])) == {}
    assert json.loads(render_results.gpu_defaults([report("a", fast, kernels_ok=False)])) == {}
    assert json.loads(render_results.gpu_defaults([report("a", {"fused-compile": 2.0})])) == {}
    # the newest report decides: an older one's choice is replaced
    table = json.loads(render_results.gpu_defaults([report("old", fast), report("new", {"compile": 1.0,
                                                                                       "fused-compile": 0.5})]))
    assert table["NVIDIA H200"]["fused"]["on"] is False


@pytest.fixture
def an_h200(monkeypatch, tmp_path):
    """resolve_runtime's view of a machine with an H200 (no GPU is touched), and a defaults table."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    table = tmp_path / "gpu_defaults.json"
    monkeypatch.setattr(runtime_module, "GPU_DEFAULTS", table)
    return table


def test_auto_on_a_gpu_without_a_report_is_the_well_trodden_path(an_h200):
    an_h200.write_text("{}")
    rt = runtime_module.resolve_runtime("cuda")
    assert (rt.amp, rt.channels_last, rt.compile, rt.fused, rt.cuda_graphs, rt.loader) == (
        "bf16", True, True, False, False, "torch")
    assert "no GPU report has measured it" in rt.fused_reason and "no GPU report" in rt.cuda_graphs_reason


def test_auto_on_a_gpu_takes_what_its_report_measured_and_flags_win(an_h200):
    an_h200.write_text(render_results.gpu_defaults([report("bench/results/y/report.json",
                                                           {"compile": 1.0, "fused-compile": 1.5})]))
    rt = runtime_module.resolve_runtime("cuda")
    assert rt.fused and not rt.cuda_graphs and "bench/results/y/report.json" in rt.fused_reason
    rt = runtime_module.resolve_runtime("cuda", fused=False, cuda_graphs=True)
    assert (rt.fused, rt.fused_reason, rt.cuda_graphs, rt.cuda_graphs_reason) == (False, "--no-fused", True,
                                                                                 "--cuda-graphs")
    # a resumed run keeps what it was started with
    rt = runtime_module.resolve_runtime("cuda", saved={"fused": False, "cuda_graphs": False})
    assert not rt.fused and not rt.cuda_graphs
    an_h200.write_text(json.dumps({"NVIDIA H200": {"fused": {"on": "yes"}}}))
    with pytest.raises(UserError, match="is not a GPU defaults table"):
        runtime_module.resolve_runtime("cuda")


def test_the_packaged_defaults_table_is_the_committed_reports():
    """preresnet/gpu_defaults.json is what bench.render_results makes of bench/results/ (no report
    yet: empty, so every GPU takes the well-trodden path)."""
    reports = render_results.load_reports(render_results.ROOT / "bench" / "results")
    assert render_results.GPU_DEFAULTS.read_text() == render_results.gpu_defaults(reports)
