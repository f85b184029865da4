"""The GPU report's bookkeeping, on a synthetic report (the measuring itself needs a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import render_results
from bench.gpu_report import add_speedups, markdown
from bench.workloads import conv_path_step, environment
from preresnet.provenance import git_commit

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "999.1", "cuda": "12.8", "torch": "2.13.0", "triton": "3.9.0",
       "commit": "abc1234", "python": "3.11", "cpu": "x86_64"}


def synthetic_report() -> dict:
    models = [{"model": "preresnet110", "provider": p, "batch": 128, "images_per_second": ips, "ms": 128e3 / ips,
               "peak_memory_bytes": 2**30, "fraction_of_floor": ips / 315_780}
              for p, ips in (("eager-fp32", 10_000.0), ("compile", 20_000.0), ("fused", 30_000.0))]
    models[-1]["layers_on_torch_ops"] = 3
    models.append({"model": "preresnet110", "provider": "cuda-graph", "error": "RuntimeError('x')"})
    add_speedups(models, "preresnet110")
    return {"date": "2026-11-27 12:00:00 UTC", "command": "python -m bench.gpu_report --out x", "environment": ENV,
            "correctness": [{"shape": "preresnet110 basic 16->16 s1 32x32", "dtype": "bfloat16", "pass": True,
                             "fused": {"output": 1e-3, "grad_input": 2e-3, "grad_conv1_weight": 3e-3},
                             "torch": {"output": 1e-3, "grad_input": 1e-3, "grad_conv1_weight": 2e-3}}],
            "correctness_pass": True,
            "matrix": {"models": models, "units": [{"shape": "s", "part": "unit", "pass": "fwd", "provider": "fused",
                                                    "batch": 128, "ms": 0.5, "images_per_second": 256_000.0}]},
            "conv_paths": {ENV["gpu"]: {"bfloat16": {
                "64x8x8->64 k3 s1 +residual": {"path": "torch", "triton_ms": 0.2, "torch_ms": 0.1, "batch": 128},
                "3x32x32->16 k3 s1 plain": {"path": "triton", "skipped": "time budget"}}}},
            "real_data": {"command": "python train.py ...", "epochs": [{"epoch": 1, "test_error": 0.5, "images_per_second": 9e4}]}}


def test_speedups_are_relative_to_eager_and_compile():
    rows = synthetic_report()["matrix"]["models"]
    fused = next(r for r in rows if r["provider"] == "fused")
    assert fused["speedup_over_eager-fp32"] == 3.0 and fused["speedup_over_compile"] == 1.5
    assert "speedup_over_compile" not in rows[-1]  # the failed provider has no figures


def test_markdown_names_device_and_every_section():
    text = markdown(synthetic_report())
    assert "NVIDIA H100 80GB HBM3" in text and "commit abc1234" in text and "PASS" in text
    assert "| preresnet110 | fused (3 layers on PyTorch ops) | 30,000 | 3.00x | 1.50x | 10% | 1.00 GiB |" in text
    assert "RuntimeError" in text and "| 1 | 50.00% | 90,000 |" in text
    assert "| 64x8x8->64 k3 s1 +residual | 0.200 | 0.100 | torch |" in text
    assert "| 3x32x32->16 k3 s1 plain | time budget | | triton |" in text


def test_a_partial_report_renders():
    """The report is saved after each section: one cut short after the correctness checks still renders."""
    report = synthetic_report()
    del report["matrix"], report["conv_paths"], report["real_data"]
    assert "## Kernel correctness: PASS" in markdown(report) and "Training step" not in markdown(report)
    assert render_results.table([{**report, "path": "x"}]).count("\n") == 1  # the header, no rows


def test_conv_path_table_takes_each_gpus_newest_measurement():
    old, new = synthetic_report(), synthetic_report()
    new["conv_paths"][ENV["gpu"]]["bfloat16"]["64x8x8->64 k3 s1 +residual"]["path"] = "triton"
    old["conv_paths"][ENV["gpu"]]["bfloat16"]["3x32x32->16 k3 s1 plain"] = {"path": "torch", "triton_ms": 2, "torch_ms": 1}
    other = {"conv_paths": {"NVIDIA A100": {"bfloat16": {"16x32x32->16 k3 s1": {"path": "torch"}}}}}
    table = json.loads(render_results.conv_paths([old, other, new]))
    assert table[ENV["gpu"]]["bfloat16"]["64x8x8->64 k3 s1 +residual"]["path"] == "triton"
    assert table["NVIDIA A100"]["bfloat16"]["16x32x32->16 k3 s1"]["path"] == "torch"
    assert table[ENV["gpu"]]["bfloat16"]["3x32x32->16 k3 s1 plain"]["path"] == "torch"  # new one skipped it


@pytest.mark.parametrize("fields", [(16, 16, 3, 1, True, True), (16, 32, 1, 2, True, False), (3, 16, 3, 1, False, False)],
                         ids=["residual", "projection", "stem"])
def test_both_layer_paths_time_the_same_layer(fields):
    """The benchmark of the two paths (interpreted here, so only the results are checked) computes the same output."""
    from preresnet.kernels.dispatch import ConvSignature

    c_in, c_out, kernel, stride, prologue, residual = fields
    signature = ConvSignature(c_in, c_out, kernel, stride, 8, 8, prologue, residual)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = (conv_path_step(signature, path, "cpu", 2, torch.float32)()
                                            for path in ("triton", "torch"))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-6)
    if prologue:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-6)


def test_readme_table_is_generated_from_reports(tmp_path):
    (tmp_path / "2026-11-27-h100").mkdir()
    (tmp_path / "2026-11-27-h100" / "report.json").write_text(json.dumps(synthetic_report()))
    readme = f"intro\n{render_results.START}\nold\n{render_results.END}\nrest\n"
    updated = render_results.render(readme, render_results.load_reports(tmp_path))
    assert updated.startswith("intro\n") and updated.endswith("\nrest\n") and "old" not in updated
    assert "| preresnet110 | fused (3 layers on PyTorch ops) | 30,000 | 3.00x | 1.50x | 10% | NVIDIA H100 80GB HBM3 | abc1234 | 2026-11-27 |" in updated
    empty = render_results.render(readme, [])
    assert "No GPU report yet" in empty


def test_committed_readme_matches_the_committed_reports():
    result = subprocess.run([sys.executable, "-m", "bench.render_results", "--check"], capture_output=True, text=True,
                            cwd=render_results.ROOT)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stubbed_report(tmp_path, monkeypatch):
    """bench.gpu_report with the GPU work replaced by stand-ins; returns (run(budget) -> exit status,
    the list of timed steps, the output folder)."""
    from bench import gpu_report, workloads

    calls = []
    out = tmp_path / "out"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PRERESNET_CONV_PATHS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: ENV["gpu"])
    monkeypatch.setattr(gpu_report, "environment", lambda device: ENV)
    monkeypatch.setattr(gpu_report, "unit_shapes", lambda: workloads.unit_shapes()[:2])
    monkeypatch.setattr(gpu_report, "layer_signatures", lambda: workloads.layer_signatures()[:2])
    errors = {"output": 1e-3, "grad_input": 1e-3, "grad_conv1_weight": 1e-3}
    monkeypatch.setattr(gpu_report, "unit_errors", lambda shape, dtype: {"fused": errors, "torch": errors})

    def measure(make_step, batch, iterations=20):
        calls.append(make_step)
        return {"ms": 2.0, "images_per_second": batch * 500.0, "peak_memory_bytes": 1}

    monkeypatch.setattr(gpu_report, "measure", measure)
    monkeypatch.setattr(gpu_report, "torch_path_layers", lambda name, device: {"layer1.0.conv1": "torch"})

    def fake_train(command, **kwargs):
        if "pytest" in command:  # the GPU tests
            assert kwargs["env"]["TRITON_INTERPRET"] == "0"
            return subprocess.CompletedProcess(command, 0, "3 passed in 1.0s\n", "")
        run_dir = Path(command[command.index("--out") + 1])
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_error": 0.4, "images_per_second": 1e4}) + "\n")
        assert kwargs["env"]["PRERESNET_CONV_PATHS"].endswith("conv_paths.json")  # the fresh table
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_report.subprocess, "run", fake_train)

    def run(budget: float) -> int:
        monkeypatch.setattr(sys, "argv", ["gpu_report", "--out", str(out), "--data-dir", "DATA",
                                          "--time-limit", str(budget)])
        return gpu_report.main()

    return run, calls, out


def test_report_runs_every_part_in_order(stubbed_report):
    """main() end to end: each section's results land in report.json in the order of the module's
    docstring (the GPU tests first), the fresh layer-path table reaches the real-data run, whose
    epochs are read back."""
    run, calls, out = stubbed_report
    assert run(600) == 0
    report = json.loads((out / "report.json").read_text())
    sections = [key for key in report if key not in ("date", "command", "environment", "seconds")]
    assert sections == ["tests", "correctness", "correctness_pass", "matrix", "conv_paths", "real_data"]
    assert report["tests"]["returncode"] == 0 and "test_kernel_stress.py" in report["tests"]["command"]
    assert len(report["correctness"]) == 6 and report["correctness_pass"]
    assert len(report["conv_paths"][ENV["gpu"]]["bfloat16"]) == 2
    assert json.loads((out / "conv_paths.json").read_text()) == report["conv_paths"]
    fused = [row for row in report["matrix"]["models"] if row["provider"] == "fused"]
    assert len(fused) == 3 and all(row["layers_on_torch_ops"] == 1 for row in fused)
    assert [row["provider"] for row in report["matrix"]["models"][:3]] == ["eager-fp32"] * 3  # baseline first
    assert {row["model"] for row in report["matrix"]["models"]} == {"preresnet110", "preresnet164", "wrn16_4"}
    assert report["real_data"]["epochs"][0]["test_error"] == 0.4
    text = (out / "report.md").read_text()
    assert text.index("## GPU tests: PASS") < text.index("## Kernel correctness") < text.index("## Training step")
    assert "## Real-data run" in text
    # timed: 7 providers x 3 networks, 2 units x 2 parts x 2 passes x 3 providers, then 2 layers x 2 paths
    assert len(calls) == 7 * 3 + 2 * 2 * 2 * 3 + 2 * 2


def test_report_out_of_time_names_what_it_skipped(stubbed_report):
    run, calls, out = stubbed_report
    assert run(1) == 1  # unchecked kernels are not passed
    report = json.loads((out / "report.json").read_text())
    assert calls == []
    assert report["tests"]["skipped"] == "time budget"
    assert all(row.get("skipped") == "time budget" for row in report["correctness"])
    assert all(entry == {"path": "triton", "skipped": "time budget"}
               for entry in report["conv_paths"][ENV["gpu"]]["bfloat16"].values())
    assert all(row.get("skipped") for row in report["matrix"]["models"] + report["matrix"]["units"])
    assert report["real_data"] == {"skipped": "time budget"}
    assert "## Kernel correctness: FAIL" in (out / "report.md").read_text()


def test_commit_is_dirty_only_for_changes_outside_the_stages_outputs(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for path in ("train.py", "bench/results/run.json", "preresnet/weights/entry.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "bench/results/run.json").write_text("1\n")
    (tmp_path / "preresnet/weights/entry.json").write_text("1\n")
    (tmp_path / "preresnet/weights/new.pt").write_text("untracked\n")
    assert git_commit(tmp_path) == clean  # a stage's results: the code measured is HEAD's
    (tmp_path / "train.py").write_text("1\n")
    assert git_commit(tmp_path) == clean + "+dirty"


def test_a_reports_environment_names_the_processor_model():
    """Reports and reproduction records name the CPU by its model (what /proc/cpuinfo says on Linux),
    not by its architecture: runs resumed on other machines must be told apart."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.partition(":")[2].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.partition(":")[0].strip() == "model name"]
    if not models:
        pytest.skip("no model name in /proc/cpuinfo on this machine")
    assert environment("cpu")["cpu"] == models[0]
