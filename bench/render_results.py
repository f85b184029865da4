"""Regenerate the README's performance table from the GPU reports under bench/results/.

    python -m bench.render_results           # rewrite the table in README.md
    python -m bench.render_results --check   # exit 1 if README.md is not up to date

The table is never typed by hand: every row names the device, commit and date of its report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"


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
        for row in report["matrix"]["models"]:
            if "images_per_second" not in row:
                continue
            speedups = [f"{row[key]:.2f}x" if key in row else "-" for key in ("speedup_over_eager-fp32", "speedup_over_compile")]
            lines.append(f"| {row['model']} | {row['provider']} | {row['images_per_second']:,.0f} | {' | '.join(speedups)} | "
                         f"{100 * row['fraction_of_floor']:.0f}% | {env.get('gpu')} | {env.get('commit')} | "
                         f"{report['date'][:10]} | {report['path']} |")
    return "\n".join(lines)


def render(readme: str, reports: list[dict]) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(reports)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    path = ROOT / "README.md"
    readme = path.read_text()
    updated = render(readme, load_reports(Path(args.results)))
    if args.check:
        if updated != readme:
            print("README.md's performance table is out of date: run python -m bench.render_results", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
