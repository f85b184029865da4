"""Claims of README.md, docs/ and bench/README.md held to the code and the results files they name.

tests/test_docs.py checks that the documented commands parse and the links resolve; this file checks
what the text says about them: the defaults and output of `python -m bench.launches` and the table
quoted from its results file, the pretrained page's Python example (run as written, with each input it names), the facts it
lists, and what the front page says CI installs.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.render_results import finished_seeds, row_statistics

ROOT = Path(__file__).resolve().parents[1]
BENCH_README = ROOT / "bench" / "README.md"
LAUNCHES_RESULTS = ROOT / "bench" / "results" / "2026-12-03-cpu-launches" / "README.md"


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
    black = -torch.tensor(loaders.CIFAR10_MEAN) / torch.tensor(loaders.CIFAR10_STD)  # the images are all 0
    assert torch.allclose(x.amin(dim=(0, 2, 3)), black)
    assert torch.equal(x.amax(dim=(0, 2, 3)), torch.zeros(3))  # "zero padding ... after normalisation"


# --- README.md ----------------------------------------------------------------------------------------------

def test_the_front_page_says_what_ci_installs():
    """The torch the front page says CI installs is the one .ci/run asks pip for, which names no index
    or build."""
    ci = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"^pip install -q (torch==[\d.]+)(.*)$", ci, flags=re.MULTILINE)
    assert installs and len({spec for spec, _ in installs}) == 1
    assert not any("index-url" in rest or "+cpu" in rest for _, rest in installs)
    text = " ".join((ROOT / "README.md").read_text().split())
    stated = re.search(r"CI \(`\.ci/run`\) runs `pip install (torch==[\d.]+)`", text)
    assert stated and stated.group(1) == installs[0][0]


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
