"""Regenerate what is derived from the GPU reports under bench/results/: the README's performance
table, its table of finished reproduction runs (bench/results/reproduce/*/run.json, written by
`python -m bench.gpu_plan reproduce`) and the fused layers' path table kernels/conv_paths.json.

    python -m bench.render_results           # rewrite both
    python -m bench.render_results --check   # exit 1 if either is not up to date

Neither is typed by hand: every README row names the device, commit and date of its report, and
each GPU's layer paths come from its newest report that measured them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONV_PATHS = ROOT / "kernels" / "conv_paths.json"
LAUNCH_CONFIGS = ROOT / "kernels" / "launch_configs.json"
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"
RUNS_START, RUNS_END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def provider_label(row: dict) -> str:
    """The provider, and for the fused ones how many layers the path table moved to PyTorch's ops."""
    moved = row.get("layers_on_torch_ops")
    return f"{row['provider']} ({moved} layers on PyTorch ops)" if moved else row["provider"]


def load_reports(results: Path) -> list[dict]:
    reports = []
    for path in sorted(results.glob("*/report.json")):
        report = json.loads(path.read_text())
        report["path"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        reports.append(report)
    return reports


def table(reports: list[dict]) -> str:
    if not reports:
        return ("No GPU report yet: no GPU has been available to this project. `python -m bench.gpu_report` "
                "writes one; this table is generated from them.")
    lines = ["| model | provider | images/s | vs eager-fp32 | vs compile | of floor | device | commit | date | report |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        env = report["environment"]
        for row in report.get("matrix", {}).get("models", []):
            if "images_per_second" not in row:
                continue
            speedups = [f"{row[key]:.2f}x" if key in row else "-" for key in ("speedup_over_eager-fp32", "speedup_over_compile")]
            lines.append(f"| {row['model']} | {provider_label(row)} | {row['images_per_second']:,.0f} | {' | '.join(speedups)} | "
                         f"{100 * row['fraction_of_floor']:.0f}% | {env.get('gpu')} | {env.get('commit')} | "
                         f"{report['date'][:10]} | {report['path']} |")
    return "\n".join(lines)


def conv_paths(reports: list[dict]) -> str:
    """The path table of kernels.paths: per GPU, dtype and layer, the newest report that measured
    that layer (reports sort by folder name, which starts with the date); entries a report skipped
    for time do not replace measured ones."""
    table: dict = {}
    for report in reports:
        for gpu, dtypes in report.get("conv_paths", {}).items():
            for dtype, entries in dtypes.items():
                known = table.setdefault(gpu, {}).setdefault(dtype, {})
                for key, entry in entries.items():
                    if "skipped" not in entry or key not in known:
                        known[key] = entry
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def launch_configs(reports: list[dict]) -> str:
    """The launch-config table of kernels.launch_configs: per GPU, dtype and layer, the configs
    (other than the defaults) of the newest report whose bench.config_search measured that layer;
    a layer it measured at the defaults leaves the table, one it skipped keeps the older entry."""
    table: dict = {}
    for report in reports:
        for gpu, dtypes in report.get("launch_configs", {}).items():
            for dtype, entries in dtypes.items():
                known = table.setdefault(gpu, {}).setdefault(dtype, {})
                for key, entry in entries.items():
                    if "configs" not in entry:
                        continue
                    if entry["configs"]:
                        known[key] = entry["configs"]
                    else:
                        known.pop(key, None)
    table = {gpu: {dtype: entries for dtype, entries in dtypes.items() if entries} for gpu, dtypes in table.items()}
    return json.dumps({gpu: dtypes for gpu, dtypes in table.items() if dtypes}, indent=1, sort_keys=True) + "\n"


def load_runs(results: Path) -> list[dict]:
    """The reproduction runs bench.gpu_plan's reproduce stage wrote: results/reproduce/NAME/run.json."""
    runs = []
    for path in sorted(results.glob("reproduce/*/run.json")):
        run = json.loads(path.read_text())
        run["path"] = str(path.parent.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path.parent)
        runs.append(run)
    return runs


def duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def runs_table(runs: list[dict]) -> str:
    """One row per finished run: the last epoch's test error (no selection on the test set)."""
    runs = [run for run in runs if not run.get("dry_run")]
    finished = [run for run in runs if run.get("finished")]
    lines = []
    if not finished:
        lines.append("No finished reproduction run yet: `python -m bench.gpu_plan reproduce` (bench/README.md) writes "
                     "them under `bench/results/reproduce/`; this table is generated from them.")
    else:
        lines += ["| network | recipe | data | test error (last epoch) | paper | wall time | images/s | GPU | "
                  "torch / triton | commit | weights |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in finished:
            weights = run.get("weights", {})
            check = weights.get("eval_test_error")
            weights_cell = (f"`{run['path']}/{weights['file']}` (eval.py: {100 * check:.2f}%)" if check is not None
                            else f"`{run['path']}/{weights.get('file', '-')}`")
            paper = f"{100 * run['paper_test_error']:.2f}%" if run.get("paper_test_error") is not None else "-"
            ips = f"{run['images_per_second']:,.0f}" if run.get("images_per_second") else "-"
            lines.append(f"| {run['network']} | {run['recipe']} | {run['data']} | **{100 * run['final_test_error']:.2f}%** | "
                         f"{paper} | {duration(run['wall_seconds'])} in {len(run.get('commands', []))} commands | {ips} | "
                         f"{run.get('gpu')} | {run.get('torch')} / {run.get('triton')} | {run.get('commit')} | {weights_cell} |")
    for run in runs:
        if not run.get("finished"):
            lines += ["", f"In progress: {run.get('network')} ({run.get('recipe')}), {max(run.get('epochs_done') or 0, 0)} of "
                          f"{run.get('epochs')} epochs after {duration(run.get('wall_seconds', 0))} (`{run['path']}`)."]
    return "\n".join(lines)


def render_runs(readme: str, runs: list[dict]) -> str:
    if RUNS_START not in readme:
        return readme
    head, rest = readme.split(RUNS_START, 1)
    _, tail = rest.split(RUNS_END, 1)
    return f"{head}{RUNS_START}\n{runs_table(runs)}\n{RUNS_END}{tail}"


def render(readme: str, reports: list[dict]) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(reports)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    reports = load_reports(Path(args.results))
    readme = render_runs(render((ROOT / "README.md").read_text(), reports), load_runs(Path(args.results)))
    outputs = {ROOT / "README.md": readme, CONV_PATHS: conv_paths(reports), LAUNCH_CONFIGS: launch_configs(reports)}
    stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date with bench/results: run python -m bench.render_results",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs[path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
