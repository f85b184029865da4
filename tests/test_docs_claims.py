"""Claims of README.md, docs/ and bench/README.md held to the code and the results files they name.

tests/test_docs.py checks that the documented commands parse and the links resolve; this file checks
what the text says about them: the defaults and output of `python -m bench.launches` and the table
quoted from its results file, the epoch times of the CPU reproduction and the command that gives
them, the pretrained page's Python example (run as written, with each input it names), the facts it
lists, and what the front page says CI installs.
"""

import json
import re
import shlex
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.render_results import finished_seeds, row_statistics

ROOT = Path(__file__).resolve().parents[1]
BENCH_README = ROOT / "bench" / "README.md"
PLAN_README = ROOT / "tools" / "gpu_plan" / "README.md"
LAUNCHES_RESULTS = ROOT / "bench" / "results" / "2026-12-03-cpu-launches" / "README.md"
CPU_RUN = ROOT / "bench" / "results" / "reproduce" / "preresnet20-paper-cifar10-jpeg-cpu"


def section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, flags=re.MULTILINE)
    assert match, f"no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.MULTILINE)
    return rest[:end.start()] if end else rest


def table(text: str, first_column: str) -> list[str]:
    """The lines of the Markdown table whose header starts with `| first_column |`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


# --- python -m bench.launches ------------------------------------------------------------------------

def launches_section() -> str:
    return section(BENCH_README.read_text(), "Launches per training step: `python -m bench.launches`")


def test_bench_readme_states_the_launch_counters_default_batch():
    from bench.launches import build_parser

    stated = re.search(r"the\s+CLI\s+runs\s+batch\s+(\d+)\s+by\s+default", launches_section())
    assert stated, "bench/README.md no longer says which batch python -m bench.launches runs by default"
    assert int(stated.group(1)) == build_parser().get_default("batch")


def test_launch_tables_have_the_columns_the_command_prints():
    """The table in bench/README.md is the results file's, and both have the command's header."""
    from bench.launches import table_lines

    quoted = table(launches_section(), "model")
    recorded = table(LAUNCHES_RESULTS.read_text(), "model")
    assert quoted[:2] == recorded[:2] == table_lines()
    assert quoted == recorded, "bench/README.md's launch table differs from its results file"
    assert "bench/results/2026-12-03-cpu-launches/" in launches_section()


@pytest.mark.slow
def test_the_launch_tables_rows_are_what_the_counter_counts():
    """WRN-16-4's rows (the cheapest network) counted again at the command's default batch."""
    from bench.launches import COUNTED_PROVIDERS, DEFAULT_BATCH, step_launches, table_row

    recorded = table(LAUNCHES_RESULTS.read_text(), "model")
    rows = [table_row("wrn16_4", provider, step_launches("wrn16_4", provider, DEFAULT_BATCH))
            for provider in COUNTED_PROVIDERS]
    assert all(row in recorded for row in rows), (rows, recorded)


def test_the_launch_ratios_quoted_are_the_tables():
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|"))[:3]
            for line in table(LAUNCHES_RESULTS.read_text(), "model")[2:]}
    counts = {(model, provider): int(launches) for model, provider, launches in rows}
    text = " ".join(launches_section().split())
    quoted = re.findall(r"(PreResNet-110|PreResNet-164|WRN-16-4) (0\.\d\d)", text)
    assert len(quoted) == 3, quoted
    for model, ratio in quoted:
        assert f"{counts[model, 'fused'] / counts[model, 'eager-fp32']:.2f}" == ratio, model


# --- the CPU reproduction ------------------------------------------------------------------------------

def command_epochs(run: dict) -> list[tuple[int | None, range]]:
    """(threads, epochs) of each command of the CPU run: run.json records each command's threads
    (None: not recorded) and its epochs, or else the epochs done after it and its train.py command
    line, found in train.log (the line after "$ ") with the epoch it resumed after."""
    segments = re.split(r"^\$ ", (CPU_RUN / "train.log").read_text(), flags=re.MULTILINE)[1:]
    found = []
    # seed 0's commands: those that trained seeds added to the row later say nothing of its epochs
    for command in [c for c in run["commands"] if "seed-0" in c.get("epochs", c.get("epochs_after", {}))]:
        if "epochs" in command:
            first, last = command["epochs"]["seed-0"]
            found.append((command["threads"], range(first, last + 1)))
            continue
        for line in command["commands"]:  # in order: each is the next train.log command with this line
            while not segments[0].splitlines()[0].endswith(line):
                segments.pop(0)
            resumed = int(re.search(r"resuming after epoch (\d+)", segments.pop(0)).group(1))
            found.append((command["threads"], range(resumed + 1, command["epochs_after"]["seed-0"] + 1)))
    return found


def epoch_seconds_by_threads() -> dict[int | None, list[tuple[int, float]]]:
    """(epoch, seconds) of the CPU run's epochs by the --threads of the command that trained them."""
    run = json.loads((CPU_RUN / "run.json").read_text())
    seconds = {row["epoch"]: row["epoch_seconds"]
               for row in map(json.loads, (CPU_RUN / "seed-0" / "metrics.jsonl").read_text().splitlines())}
    by_threads: dict[int | None, list[tuple[int, float]]] = {}
    for threads, epochs in command_epochs(run):
        by_threads.setdefault(threads, []).extend((epoch, seconds[epoch]) for epoch in epochs)
    return by_threads


def test_the_cpu_reproductions_epoch_times_are_its_metrics():
    text = " ".join(PLAN_README.read_text().split())
    claim = re.search(r"with 2 threads (\d+)-(\d+) s an epoch \(epochs (\d+)-(\d+), median (\d+) s: about (\d+) "
                      r"hours for 164 epochs, at most (\d+)\)", text)
    assert claim, "tools/gpu_plan/README.md's epoch times of the CPU reproduction with 2 threads"
    low, high, first, last, median, hours, most = map(int, claim.groups())
    two = epoch_seconds_by_threads()[2]
    assert [epoch for epoch, _ in two] == list(range(first, last + 1))
    times = [s for _, s in two]
    assert (low, high, median) == (round(min(times)), round(max(times)), round(statistics.median(times)))
    assert (hours, most) == (round(164 * statistics.median(times) / 3600), round(164 * max(times) / 3600))
    assert 164 * max(times) < 36000  # "fits the 10 hours of --budget-seconds 36000"

    claim = re.search(r"with the default 1 thread, .*? (\d+)-(\d+) s an epoch \(epochs (\d+)-(\d+) but a stalled one, "
                      r"median (\d+) s: 164 epochs take about (\d+) hours, more than that budget", text)
    assert claim, "tools/gpu_plan/README.md's epoch times of the CPU reproduction with 1 thread"
    low, high, first, last, median, hours = map(int, claim.groups())
    one = epoch_seconds_by_threads()[1]
    assert [epoch for epoch, _ in one] == list(range(first, last + 1))
    times = [s for _, s in one]
    stalled = [s for s in times if s > 3 * statistics.median(times)]
    steady = [s for s in times if s not in stalled]
    assert len(stalled) == 1
    assert (low, high, median) == (round(min(steady)), round(max(steady)), round(statistics.median(times)))
    assert hours == round(164 * statistics.median(times) / 3600) and 164 * statistics.median(times) > 36000

    claim = re.search(r"The finished run took (\d+\.\d) h of epoch time in all, slow epochs included \(median (\d+) s\)",
                      text)
    everything = [row["epoch_seconds"]
                  for row in map(json.loads, (CPU_RUN / "seed-0" / "metrics.jsonl").read_text().splitlines())]
    assert claim and len(everything) == 164
    assert claim.groups() == (f"{sum(everything) / 3600:.1f}", f"{statistics.median(everything):.0f}")
    recorded = sum(len(epochs) for threads, epochs in epoch_seconds_by_threads().items() if threads is not None)
    unrecorded = re.search(r"`run.json` does not record the threads of its first (\d+) epochs and its last (\d+)", text)
    assert unrecorded and int(unrecorded.group(1)) == first - 1 and \
        int(unrecorded.group(1)) + recorded + int(unrecorded.group(2)) == 164


def test_the_packed_seeds_epoch_times_are_their_metrics():
    """Seeds 1 and 2 of the CPU run trained packed: an epoch of the two lasts as long as the slower
    seed's; tools/gpu_plan/README.md quotes its median at each learning rate and the epochs' total."""
    text = " ".join(PLAN_README.read_text().split())
    claim = re.search(r"an epoch of the two took a median (\d+) s at lr 0\.1 \(epochs (\d+)-(\d+)\), (\d+) s at lr "
                      r"0\.01 and (\d+) s at lr 0\.001 \(epochs (\d+)-(\d+): (\d+\.\d) h\)", text)
    assert claim, "tools/gpu_plan/README.md's epoch times of the packed seeds 1 and 2"
    at_01, first, last, at_001, at_0001, total_first, total_last, hours = claim.groups()
    seconds, lrs = {}, {}
    for seed in ("seed-1", "seed-2"):
        for row in map(json.loads, (CPU_RUN / seed / "metrics.jsonl").read_text().splitlines()):
            seconds[row["epoch"]] = max(seconds.get(row["epoch"], 0.0), row["epoch_seconds"])
            lrs[row["epoch"]] = round(row["lr"], 6)
    assert sorted(seconds) == list(range(1, 165))
    # the quoted lr 0.1 epochs: all of them after the compiling and disturbed first ones
    assert int(last) == max(e for e, lr in lrs.items() if lr == 0.1)
    phases = {0.1: range(int(first), int(last) + 1),
              **{lr: [e for e, v in lrs.items() if v == lr] for lr in (0.01, 0.001)}}
    medians = {lr: round(statistics.median(seconds[e] for e in epochs)) for lr, epochs in phases.items()}
    assert (int(at_01), int(at_001), int(at_0001)) == (medians[0.1], medians[0.01], medians[0.001])
    assert (int(total_first), int(total_last)) == (7, 164)
    assert hours == f"{sum(seconds[e] for e in range(7, 165)) / 3600:.1f}"


def test_the_cpu_reproduction_command_runs_with_the_threads_it_was_timed_with():
    from tools.gpu_plan.plan import build_parser

    text = " ".join(PLAN_README.read_text().split())
    command = re.search(r"`python -m tools\.gpu_plan (reproduce --model preresnet20 --device cpu [^`]*)`", text)
    assert command, "tools/gpu_plan/README.md's CPU reproduction command"
    args = build_parser().parse_args(shlex.split(command.group(1)))
    assert args.threads == 2 and args.budget_seconds == 36000
    assert build_parser().parse_args(["reproduce"]).threads == 1  # "--threads defaults to 1"


def test_the_checkpoint_sizes_quoted_are_the_plans_estimate():
    from tools.gpu_plan.reproduce import checkpoint_bytes

    text = " ".join(PLAN_README.read_text().split())
    quoted = re.search(r"`checkpoint_bytes`, weights and momentum in fp32: (\d+\.\d) MiB for PreResNet-110, "
                       r"(\d+\.\d) for PreResNet-164, (\d+\.\d) for WRN-16-4", text)
    assert quoted, "tools/gpu_plan/README.md's checkpoint sizes"
    assert list(quoted.groups()) == [f"{checkpoint_bytes(name) / 2**20:.1f}"
                                     for name in ("preresnet110", "preresnet164", "wrn16_4")]


# --- the estimates on paper --------------------------------------------------------------------------------

def test_the_floors_table_is_what_the_command_prints():
    from bench.floors import estimate, markdown_table
    from preresnet import list_models

    rows = [estimate(name) for name in list_models()]
    quoted = table(section(BENCH_README.read_text(), "Estimates on paper"), "model")
    assert quoted == markdown_table(rows).splitlines()
    # the parameters' traffic beside the activations' (8 fp32 passes a step at batch 128)
    import torch as _torch

    from preresnet import get_model

    text = " ".join(section(BENCH_README.read_text(), "Estimates on paper").split())
    shares = re.search(r"some (\d+)% of the activation traffic for PreResNet-110, (\d+)% for WRN-16-4 and (\d+)% for "
                       r"WRN-28-10", text)
    assert shares, "bench/README.md's parameter traffic"
    by_name = {row["model"]: row for row in rows}
    for name, share in zip(("preresnet110", "wrn16_4", "wrn28_10"), map(int, shares.groups())):
        with _torch.device("meta"):
            parameters = sum(p.numel() for p in get_model(name).parameters())
        assert round(100 * 8 * 4 * parameters / 128 / by_name[name]["activation_bytes_per_image"]) == share, name


# --- docs/pretrained.md ----------------------------------------------------------------------------------

PRETRAINED = ROOT / "docs" / "pretrained.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture
def shipped_registry(monkeypatch):
    """The registry as installed: the page's example names the shipped entry."""
    monkeypatch.delenv("PRERESNET_WEIGHTS_DIR", raising=False)


def cifar_images(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("batch_form, image_form", [("numpy NHWC", "PIL"), ("tensor NCHW", "numpy HWC"),
                                                     ("tensor NHWC", "tensor CHW")])
def test_the_pretrained_pages_example_runs_as_written(shipped_registry, batch_form, image_form):
    """The page's Python block, run with the path of this checkout for path/to/preresnet, with the
    batch (`images`) and the single image (`image`) in each form its comments name."""
    [block] = python_blocks(PRETRAINED.read_text())
    array = cifar_images(4)
    batches = {"numpy NHWC": array, "tensor NCHW": torch.from_numpy(array).permute(0, 3, 1, 2),
               "tensor NHWC": torch.from_numpy(array)}
    images = {"PIL": Image.fromarray(array[0]), "numpy HWC": array[0],
              "tensor CHW": torch.from_numpy(array[0]).permute(2, 0, 1)}
    namespace = {"images": batches[batch_form], "image": images[image_form]}
    # run up to the last logits line, keep the model and weights those lines used, then run the rest
    # (later lines load other models: torch.hub's DEFAULT need not be the entry above it)
    lines = block.replace("path/to/preresnet", str(ROOT)).splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith("logits = "))
    exec(compile("".join(lines[:last + 1]), str(PRETRAINED), "exec"), namespace)
    weights, model = namespace["weights"], namespace["model"]
    exec(compile("\n" * (last + 1) + "".join(lines[last + 1:]), str(PRETRAINED), "exec"), namespace)
    assert namespace["logits"].shape == (1, 10)  # the last logits line: one image, made a batch of one
    batch_logits = model(weights.transforms()(batches[batch_form]))
    assert batch_logits.shape == (4, 10)
    torch.testing.assert_close(namespace["logits"], batch_logits[:1])  # the image is the batch's first
    assert weights.transforms()(images[image_form]).shape == (3, 32, 32)  # "one image ... gives CHW"


def test_the_pretrained_page_lists_every_fact_of_an_entry():
    from preresnet.pretrained import REQUIRED

    facts = " ".join(re.search(r"\*\*Facts in `NAME.json`\*\*(.*?)\n\n", PRETRAINED.read_text(), flags=re.DOTALL)
                     .group(1).split())
    missing = [key for key in REQUIRED if f"`{key}`" not in facts]
    assert not missing, f"docs/pretrained.md's facts of NAME.json lack {missing}"


# --- docs/data.md ------------------------------------------------------------------------------------------

def test_the_data_pages_python_example_runs_as_written():
    """The loader example gives what its comment says: 128 x 3 x 32 x 32 float32 batches, int64 labels,
    normalised with CIFAR-10's mean and std when none are given."""
    from preresnet import loaders

    [block] = python_blocks((ROOT / "docs" / "data.md").read_text())
    namespace = {}
    exec(compile(block, str(ROOT / "docs" / "data.md"), "exec"), namespace)
    x, y = namespace["x"], namespace["y"]
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert "default to CIFAR-10's" in (ROOT / "docs" / "data.md").read_text()
    black = -torch.tensor(loaders.CIFAR10_MEAN) / torch.tensor(loaders.CIFAR10_STD)  # the images are all 0
    assert torch.allclose(x.amin(dim=(0, 2, 3)), black)
    assert torch.equal(x.amax(dim=(0, 2, 3)), torch.zeros(3))  # "zero padding ... after normalisation"


# --- README.md ----------------------------------------------------------------------------------------------

def test_the_front_page_says_what_ci_installs():
    """.ci/run asks pip for torch==2.13.0 without an index or a build: the front page says so."""
    ci = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"^pip install -q (torch==[\d.]+)(.*)$", ci, flags=re.MULTILINE)
    assert installs and all(spec == "torch==2.13.0" for spec, _ in installs)
    assert not any("index-url" in rest or "+cpu" in rest for _, rest in installs)
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "runs `pip install torch==2.13.0` in a fresh environment, naming no index or build" in text
    assert "(a CPU build)" not in text


def finished_reproductions() -> list[dict]:
    """run.json of every reproduction under bench/results/reproduce/ with a row in the results table (a
    finished seed; seeds added to it later may still be training)."""
    rows = [json.loads(path.read_text()) for path in sorted((ROOT / "bench" / "results" / "reproduce").glob("*/run.json"))]
    return [row for row in rows if finished_seeds(row) and not row.get("dry_run")]


def test_the_front_page_status_and_the_benchmarks_page_name_every_finished_run_with_its_error():
    """Each finished reproduction: its network and mean test error in the front page's status line, and
    its folder, error and weights entry in docs/benchmarks.md's list of what has been measured."""
    rows = finished_reproductions()
    assert rows, "no finished reproduction under bench/results/reproduce"
    readme = " ".join((ROOT / "README.md").read_text().split())
    status = readme[readme.index("**Status:**"):readme.index("## Install")]
    benchmarks = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    words = {1: "One", 2: "Two", 3: "Three", 4: "Four"}
    assert f"{words[len(rows)]} full-schedule run" in status
    for row in rows:
        error = f"{100 * row_statistics(row)['mean']:.2f}%"
        assert re.search(rf"{re.escape(row['network'])}\b[^%]*?{re.escape(error)}", status), (row["network"], error)
        entries = [run["weights"]["entry"] for run in finished_seeds(row).values()]
        folder = f"`bench/results/reproduce/{row['name']}/`"
        assert folder in benchmarks, folder
        claim = benchmarks[benchmarks.index(folder):][:600]
        assert error in claim and all(f"`{entry}`" in claim for entry in entries), (row["name"], error, entries)
