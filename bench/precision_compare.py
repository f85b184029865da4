"""fp32 against bf16 autocast: the same packed seeds trained once in each precision, compared on
their last epoch's test error (no selection), with the rule that decides whether bf16 may become
a CPU's `--amp auto` (preresnet/runtime.py CPU_BF16_AUTO):

    bf16 holds if its mean error lies within the fp32 seeds' spread (min to max), or within
    MAX_GAP (0.5 points) of the fp32 mean.

    python -m bench.precision_compare runs/precision/fp32 runs/precision/bf16 --out bench/results/DATE-cpu-precision

Each folder is a train.py --seeds folder (seed-N run folders). The output folder gets
comparison.json (every seed's last-epoch error, epochs done, both means and spreads, the verdict)
and, for an unfinished comparison, the verdict "pending" with each run's progress. Only runs that
finished every epoch count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from preresnet.runfiles import read_metrics

MAX_GAP = 0.005  # half a percentage point of test error


def precision_runs(folder: Path) -> dict:
    """The seed-N runs of a --seeds folder: epochs done of the schedule, last-epoch test error."""
    runs = {}
    for run in sorted(folder.glob("seed-*")):
        config = json.loads((run / "config.json").read_text())
        metrics = read_metrics(run)  # [] before the first epoch
        epochs = config["recipe"]["epochs"]
        done = metrics[-1]["epoch"] if metrics else 0
        runs[run.name] = {"epochs_done": done, "epochs": epochs, "amp": config["runtime"]["amp"],
                          "channels_last": config["runtime"]["channels_last"],
                          "last_test_error": metrics[-1]["test_error"] if metrics else None,
                          "finished": done == epochs}
    return runs


def spread(errors: list[float]) -> dict:
    return {"mean": statistics.fmean(errors), "std": statistics.stdev(errors) if len(errors) > 1 else None,
            "min": min(errors), "max": max(errors), "runs": len(errors)}


def verdict(fp32: dict, bf16: dict) -> dict:
    """holds / fails / pending, and why."""
    pending = [f"{precision} {name} at epoch {run['epochs_done']} of {run['epochs']}"
               for precision, runs in (("fp32", fp32), ("bf16", bf16)) for name, run in runs.items()
               if not run["finished"]]
    if pending or not fp32 or not bf16 or set(fp32) != set(bf16):
        return {"verdict": "pending", "why": "; ".join(pending) or "the two folders do not hold the same seeds"}
    a, b = (spread([run["last_test_error"] for run in runs.values()]) for runs in (fp32, bf16))
    within_spread = a["min"] <= b["mean"] <= a["max"]
    gap = b["mean"] - a["mean"]
    holds = within_spread or abs(gap) <= MAX_GAP
    why = (f"bf16 mean {100 * b['mean']:.2f}% against fp32 mean {100 * a['mean']:.2f}% (gap {100 * gap:+.2f} points; "
           f"fp32 seeds {100 * a['min']:.2f}% to {100 * a['max']:.2f}%): "
           + ("within the fp32 spread" if within_spread else f"{'within' if holds else 'beyond'} 0.5 points"))
    return {"verdict": "holds" if holds else "fails", "why": why, "fp32": a, "bf16": b, "gap": gap}


def compare(fp32_folder: Path, bf16_folder: Path) -> dict:
    fp32, bf16 = precision_runs(fp32_folder), precision_runs(bf16_folder)
    return {"fp32_runs": fp32, "bf16_runs": bf16, **verdict(fp32, bf16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path, help="the fp32 runs' --seeds folder")
    parser.add_argument("bf16", type=Path, help="the bf16 runs' --seeds folder")
    parser.add_argument("--out", type=Path, help="write comparison.json here")
    args = parser.parse_args(argv)
    result = compare(args.fp32, args.bf16)
    for precision in ("fp32", "bf16"):
        for name, run in result[f"{precision}_runs"].items():
            error = "-" if run["last_test_error"] is None else f"{100 * run['last_test_error']:.2f}%"
            print(f"{precision} {name}: epoch {run['epochs_done']}/{run['epochs']}, last test error {error}")
    print(f"{result['verdict']}: {result['why']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
