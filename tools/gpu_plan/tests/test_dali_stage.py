"""The GPU plan's stage `dali` (tools/gpu_plan/dali_stage.py): its CPU dry run end to end, the choice
`--loader auto` follows, what bench.render_results makes of a GPU's report (the README's loader line,
preresnet/loader_choice.json), and `gpu_plan next` naming the stage once first-contact has passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import render_results
from preresnet import loaders
from tools.gpu_plan import dali_stage
from tools.gpu_plan import plan as gpu_plan
from tools.gpu_plan.common import kernels_digest

ROOT = Path(__file__).resolve().parents[3]


def test_dry_run_measures_each_backend_and_the_step_each_feeds(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    results = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "tools.gpu_plan", "dali", "--dry-run", "--results", str(results),
                             "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "STAND-IN" in result.stdout and "Traceback" not in result.stdout + result.stderr
    [folder] = results.iterdir()
    assert folder.name.endswith("-cpu-dry-run-dali")
    # what comes back from a device command: a few files, one folder below the results root
    assert sorted(p.name for p in folder.iterdir()) == ["pytest-gpu.log", "report.json", "report.md"]
    report = json.loads((folder / "report.json").read_text())
    assert report["stage"] == "dali" and report["dry_run"] and report["finished"] == loaders.dali_available()
    assert [p["name"] for p in report["parts"]] == ["tests", "loaders", "step"]
    assert report["parts"][0]["status"] == "stand-in" and not report["tests"]["passed"]
    assert report["tests"]["skipped"] == 11  # the gpu-marked loader tests collect, and skip without a GPU
    measured = [row["backend"] for row in report["loaders"] if row.get("images_per_second", 0) > 0]
    fed = [row["feed"] for row in report["step"]["rows"] if row.get("images_per_second", 0) > 0]
    if loaders.dali_available():
        assert measured == ["torch", "dali"] and fed == ["fixed batch", "torch", "dali"]
        assert all(0 <= row["loader_share"] < 1 for row in report["step"]["rows"] if row["feed"] != "fixed batch")
        # a dry run never vouches for DALI's GPU batches
        assert report["choice"]["backend"] == "torch" and "not shown identical" in report["choice"]["reason"]
    else:
        assert measured == ["torch"] and fed == ["fixed batch", "torch"] and report["choice"] is None
        assert report["loaders"][-1] == {"backend": "dali", "skipped": "NVIDIA DALI is not installed"}
    text = (folder / "report.md").read_text()
    assert "DRY RUN" in text and "## Loaders" in text and "## Training step of PreResNet-8" in text
    # a dry run is no measurement: the plan still calls for the stage, the loader table stays empty
    assert not dali_stage.measured([results])
    assert render_results.loader_choice(render_results.load_reports(results)) == "{}\n"


def step_report(dali_ips=20_000.0, torch_ips=20_000.0, passed=True, feeds=("fixed batch", "torch", "dali")) -> dict:
    speeds = {"fixed batch": 25_000.0, "torch": torch_ips, "dali": dali_ips}
    rows = [{"feed": feed, "images_per_second": speeds[feed], "seconds": [2.0]} for feed in feeds]
    for row in rows[1:]:
        row["loader_share"] = 1 - row["images_per_second"] / speeds["fixed batch"]
    return {"tests": {"passed": passed}, "step": {"model": "PreResNet-110", "amp": "bf16", "cuda_graphs": True,
                                                   "rows": rows}}


def test_dali_only_where_its_batches_passed_and_its_step_is_not_slower():
    assert dali_stage.choose(step_report(dali_ips=19_700))["backend"] == "dali"  # within 2%: not slower
    assert dali_stage.choose(step_report(dali_ips=21_000))["backend"] == "dali"
    slower = dali_stage.choose(step_report(dali_ips=19_500))
    assert slower["backend"] == "torch" and slower["reason"].endswith("DALI slower")
    assert "fed by DALI 19,500 images/s, by the torch loader 20,000" in slower["reason"]
    assert dali_stage.choose(step_report(dali_ips=30_000, passed=False))["backend"] == "torch"
    assert dali_stage.choose(step_report(feeds=("fixed batch", "torch"))) is None


def write_report(results: Path, name: str, gpu: str, dry_run=False, **speeds) -> None:
    report = {**step_report(**speeds), "stage": "dali", "date": f"{name[:10]} 12:00:00 UTC", "dry_run": dry_run,
              "environment": {"gpu": gpu, "torch": "2.11.0+cu130", "dali": "2.4.0", "commit": "abc1234"},
              "images": 50_000, "batch": 128,
              "loaders": [{"backend": "torch", "images": 49_920, "images_per_second": 400_000.0},
                          {"backend": "dali", "images": 49_920, "images_per_second": 99_840.0}]}
    report["choice"] = dali_stage.choose(report)
    (results / name).mkdir(parents=True)
    (results / name / "report.json").write_text(json.dumps(report))


def test_render_results_makes_the_loader_table_and_line_from_the_newest_gpu_report(tmp_path, monkeypatch):
    results = tmp_path / "results"
    write_report(results, "2026-12-01-h200-dali", "NVIDIA H200", dali_ips=15_000)
    write_report(results, "2026-12-02-h200-dali", "NVIDIA H200", dali_ips=20_100)
    write_report(results, "2026-12-03-h100-dali", "NVIDIA H100 80GB HBM3", dali_ips=10_000)
    write_report(results, "2026-12-04-h100-dali", "NVIDIA H100 80GB HBM3", dry_run=True, dali_ips=30_000)
    reports = render_results.load_reports(results)
    table = json.loads(render_results.loader_choice(reports))
    assert {gpu: entry["backend"] for gpu, entry in table.items()} == {"NVIDIA H200": "dali",
                                                                       "NVIDIA H100 80GB HBM3": "torch"}
    assert table["NVIDIA H200"]["date"] == "2026-12-02" and "2026-12-02-h200-dali" in table["NVIDIA H200"]["reason"]
    line = render_results.loader_line(reports)
    assert ("one training epoch of 50,000 images at batch 128 takes the torch loader 0.12 s (400,000 images/s) and "
            "the DALI GPU pipeline 0.50 s (99,840 images/s)") in line
    assert ("runs at 25,000 images/s on a fixed batch, 20,000 fed by the torch loader and 20,100 fed by DALI (the "
            "loader's share of a step: 20.0% and 19.6%)") in line
    assert "`--loader auto` takes DALI on this GPU" in line and "takes the torch loader on this GPU" in line
    readme = f"a\n{render_results.LOADER_START}\nold\n{render_results.LOADER_END}\nb\n"
    assert render_results.render_loader_line(readme, reports) == \
        f"a\n{render_results.LOADER_START}\n{line}\n{render_results.LOADER_END}\nb\n"
    assert render_results.render_loader_line("no markers\n", reports) == "no markers\n"
    (tmp_path / "data.md").write_text(readme)
    (tmp_path / "other.md").write_text("no markers\n")
    assert render_results.render_loader_pages([tmp_path / "data.md", tmp_path / "other.md"], reports) == \
        {tmp_path / "data.md": render_results.render_loader_line(readme, reports)}
    assert "not measured yet" in render_results.loader_line([])
    assert render_results.table(reports).startswith("No GPU report yet")  # loaders are not training-step rows
    # the table is what --loader auto reads
    table_file = tmp_path / "loader_choice.json"
    table_file.write_text(render_results.loader_choice(reports))
    monkeypatch.setattr(loaders, "CHOICE_TABLE", table_file)
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    backend, reason = loaders.auto_backend("cuda")
    assert backend == "dali" and reason.startswith("measured on NVIDIA H200: a PreResNet-110 step fed by DALI 20,100")


def test_next_names_the_stage_once_first_contact_has_passed(tmp_path):
    assert "dali" not in gpu_plan.next_stage([tmp_path])[1]
    report = tmp_path / "2026-12-01-h100" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"stage": "first-contact", "passed": True, "kernels_digest": kernels_digest()}))
    stage, why = gpu_plan.next_stage([tmp_path])
    assert stage == "reproduce --model preresnet110" and "the stage dali" in why
    write_report(tmp_path, "2026-12-02-h100-dali", "NVIDIA H100 80GB HBM3", dry_run=True)
    assert "the stage dali" in gpu_plan.next_stage([tmp_path])[1]  # a dry run measures nothing
    write_report(tmp_path, "2026-12-03-h100-dali", "NVIDIA H100 80GB HBM3")
    assert "dali" not in gpu_plan.next_stage([tmp_path])[1]


@pytest.mark.parametrize("log, counts", [
    ("....\n7 passed in 3.1s\n", {"passed": 7}),
    ("F..\n=== 1 failed, 6 passed, 2 skipped in 9.0s ===\n", {"failed": 1, "passed": 6, "skipped": 2}),
    ("sssssss\n7 skipped, 94 deselected in 5.40s\n", {"skipped": 7, "deselected": 94}),
    ("E\n1 error in 0.5s\n", {"error": 1}),
    ("Traceback (most recent call last):\n", {}),
])
def test_pytest_summary_is_read(log, counts):
    assert dali_stage.pytest_counts(log) == counts
