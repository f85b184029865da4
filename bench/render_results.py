"""Regenerate what is derived from the GPU reports under bench/results/: the README's performance
table and the fused layers' path table kernels/conv_paths.json.

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
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"


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
    outputs = {ROOT / "README.md": render((ROOT / "README.md").read_text(), reports), CONV_PATHS: conv_paths(reports)}
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
