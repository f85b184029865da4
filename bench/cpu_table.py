"""The CPU training-step table of docs/benchmarks.md, generated from a pytest-benchmark results file
of the CPU section (bench/test_cpu_steps.py):

    pytest bench/test_cpu_steps.py --benchmark-only --benchmark-json bench/results/2026-12-03-cpu-steps/benchmarks.json
    python -m bench.cpu_table bench/results/2026-12-03-cpu-steps/benchmarks.json           # rewrite the table
    python -m bench.cpu_table bench/results/2026-12-03-cpu-steps/benchmarks.json --check   # exit 1 if out of date

Per network and provider: images/s (the median of the timed rounds), the ratio to fp32 channels-last
(bench.workloads.CPU_BASELINE) and the untimed first step (torch.compile's code generation for
`compile`); above the table the processor, the instruction sets it computes bf16 with natively,
torch, threads, date, commit and the results file (and the first line of the README.md beside it,
which says how the run was made). It stands between the markers CPU_START and CPU_END.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.render_results import ROOT, between, shown
from bench.workloads import CPU_BASELINE, CPU_PROVIDERS, network_name

DOCS = ROOT / "docs" / "benchmarks.md"
CPU_START, CPU_END = "<!-- cpu-steps -->", "<!-- /cpu-steps -->"
TARGET = 1.8  # bf16 channels-last over fp32 channels-last, on a CPU with native bf16 (issue 24)
WHAT_RUNS = {"eager-fp32": "fp32, NCHW", "eager-fp32-cl": "fp32, channels-last",
             "eager-amp-cl": "bf16 autocast, channels-last", "compile": "bf16 autocast, channels-last, torch.compile"}


def load_rows(results: dict) -> list[dict]:
    """One row per CPU training-step benchmark: its extra_info with images/s and the median step."""
    rows = []
    for bench in results.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if info.get("device") != "cpu" or info.get("provider") not in CPU_PROVIDERS or "model" not in info:
            continue
        median = bench["stats"]["median"]
        info["median_seconds"], info["rounds"] = median, bench["stats"].get("rounds")
        info.setdefault("images_per_second", info["batch"] / median)
        rows.append(info)
    return rows


def distinct(rows: list[dict], key: str) -> str:
    """The rows' values of key, each once (a list's items joined, "none (emulated)" for an empty one)."""
    values = ((", ".join(value) or "none (emulated)") if isinstance(value, list) else str(value)
              for value in (row.get(key) for row in rows))
    return " / ".join(dict.fromkeys(values))


def about(path: Path) -> str | None:
    """The first line of the README.md beside the results file, '#' stripped."""
    readme = path.parent / "README.md"
    lines = readme.read_text().splitlines() if readme.is_file() else []
    return next((line.strip().lstrip("#").strip() for line in lines if line.strip()), None)


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: dict, path: Path) -> str:
    rows = load_rows(results)
    source = f"`{shown(path.resolve())}`"
    if not rows:
        return f"No CPU training-step row in {source}."
    note = about(path)
    date = str(results.get("datetime", ""))[:10] or "date not recorded"
    header = (f"{distinct(rows, 'cpu_name')}, native bf16: {distinct(rows, 'native_bf16')}; torch "
              f"{distinct(rows, 'torch')}, {distinct(rows, 'threads')} threads, batch {distinct(rows, 'batch')}, "
              f"median of {distinct(rows, 'rounds')} timed rounds; commit {distinct(rows, 'commit')}, {date}; "
              f"{source}" + (f" ({note})" if note else "") + ".")
    lines = [header, "",
             f"| network | provider | what runs | images/s | step (ms) | vs {CPU_BASELINE} | first step (s) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    speedups = []
    for model in dict.fromkeys(row["model"] for row in rows):
        by_provider = {row["provider"]: row for row in rows if row["model"] == model}
        base = by_provider.get(CPU_BASELINE)
        for provider in CPU_PROVIDERS:
            if (row := by_provider.get(provider)) is None:
                continue
            vs = row["images_per_second"] / base["images_per_second"] if base else None
            first = row.get("first_step_seconds")
            lines.append(f"| {network_name(model)} | `{provider}` | {WHAT_RUNS[provider]} | "
                         f"{row['images_per_second']:,.0f} | {1000 * row['median_seconds']:,.1f} | {ratio(vs)} | "
                         f"{'-' if first is None else f'{first:.1f}'} |")
            if provider == "eager-amp-cl":
                speedups.append(f"{network_name(model)} {ratio(vs)}")
    if speedups:
        lines += ["", f"bf16 channels-last over fp32 channels-last: {', '.join(speedups)} (the target: at least "
                      f"{TARGET}x on a CPU with native bf16)."]
    return "\n".join(lines)


def render(text: str, body: str) -> str:
    """text with what stands between the markers replaced by body."""
    if CPU_START not in text or CPU_END not in text:
        raise ValueError(f"the page has no {CPU_START} ... {CPU_END} markers")
    return between(text, CPU_START, CPU_END, body)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON of bench/test_cpu_steps.py (--benchmark-json)")
    parser.add_argument("--docs", default=str(DOCS), help="the page holding the markers (default docs/benchmarks.md)")
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path, docs = Path(args.results), Path(args.docs)
    text, body = docs.read_text(), table(json.loads(path.read_text()), path)
    rendered = render(text, body)
    if args.check:
        if rendered != text:
            print(f"{docs} is out of date with {path}: run python -m bench.cpu_table {path}", file=sys.stderr)
            return 1
        return 0
    if rendered != text:
        docs.write_text(rendered)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
