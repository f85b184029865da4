"""bench.cpu_table: the CPU training-step table of docs/benchmarks.md from a pytest-benchmark JSON."""

import json

import pytest

from bench import cpu_table
from bench.cpu_table import CPU_END, CPU_START

# median seconds of a step at batch 128, per network and provider
MEDIANS = {"preresnet20": {"eager-fp32": 0.8, "eager-fp32-cl": 0.64, "eager-amp-cl": 0.32, "compile": 0.256},
           "preresnet110": {"eager-fp32": 4.0, "eager-fp32-cl": 3.2, "eager-amp-cl": 2.0}}


def synthetic_results() -> dict:
    env = {"device": "cpu", "batch": 128, "torch": "2.13.0+cpu", "commit": "abc1234", "cpu_name": "Test CPU",
           "native_bf16": ["avx512_bf16", "amx_bf16"], "threads": 2}
    benchmarks = [{"name": f"test_cpu_training_step[{model}-{provider}]",
                   "stats": {"median": median, "rounds": 5},
                   "extra_info": {**env, "model": model, "provider": provider, "images_per_second": 128 / median,
                                  "first_step_seconds": 50.0 if provider == "compile" else 0.5}}
                  for model, providers in MEDIANS.items() for provider, median in providers.items()]
    benchmarks.append({"name": "test_training_step[other]", "stats": {"median": 1.0},
                       "extra_info": {"device": "cpu", "batch": 8, "provider": "fused", "model": "wrn16_4"}})
    return {"datetime": "2026-12-03T10:00:00+00:00", "benchmarks": benchmarks}


@pytest.fixture
def results_file(tmp_path):
    folder = tmp_path / "2026-12-03-cpu-steps"
    folder.mkdir()
    path = folder / "benchmarks.json"
    path.write_text(json.dumps(synthetic_results()))
    (folder / "README.md").write_text("# CPU training steps, a synthetic run\n\nmore\n")
    return path


def rows_of(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| PreResNet"):
            rows[(cells[0], cells[1].strip("`"))] = cells
    return rows


def test_table_gives_images_per_second_and_ratios_to_fp32_channels_last(results_file):
    text = cpu_table.table(json.loads(results_file.read_text()), results_file)
    rows = rows_of(text)
    assert len(rows) == 7  # the other benchmark is not a CPU-section row
    assert rows[("PreResNet-20", "eager-fp32")][3:6] == ["160", "800.0", "0.80x"]
    assert rows[("PreResNet-20", "eager-fp32-cl")][5] == "1.00x"
    assert rows[("PreResNet-20", "eager-amp-cl")][3:6] == ["400", "320.0", "2.00x"]
    assert rows[("PreResNet-20", "compile")][5:7] == ["2.50x", "50.0"]
    assert rows[("PreResNet-110", "eager-amp-cl")][5] == "1.60x"
    assert ("PreResNet-110", "compile") not in rows  # a row the run did not make is not invented
    assert "Test CPU, native bf16: avx512_bf16, amx_bf16; torch 2.13.0+cpu, 2 threads, batch 128, median of 5" in text
    assert "commit abc1234, 2026-12-03" in text
    assert "(CPU training steps, a synthetic run)" in text  # the README beside the results
    assert "PreResNet-20 2.00x, PreResNet-110 1.60x" in text


def test_main_replaces_only_what_stands_between_the_markers(results_file, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Page\n\nbefore\n\n{CPU_START}\nold table\n{CPU_END}\n\nafter\n")
    assert cpu_table.main([str(results_file), "--docs", str(docs), "--check"]) == 1
    assert cpu_table.main([str(results_file), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "old table" not in text
    assert text.startswith("# Page\n\nbefore\n\n") and text.endswith(f"{CPU_END}\n\nafter\n")
    body = text.split(CPU_START + "\n", 1)[1].split("\n" + CPU_END, 1)[0]
    assert body == cpu_table.table(synthetic_results(), results_file)
    assert cpu_table.main([str(results_file), "--docs", str(docs), "--check"]) == 0
    assert cpu_table.main([str(results_file), "--docs", str(docs)]) == 0 and docs.read_text() == text


def test_a_page_without_the_markers_is_an_error(results_file, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Page\n")
    with pytest.raises(ValueError, match="markers"):
        cpu_table.main([str(results_file), "--docs", str(docs)])


def test_the_docs_page_has_the_markers():
    text = cpu_table.DOCS.read_text()
    assert text.count(CPU_START) == 1 and text.count(CPU_END) == 1 and text.index(CPU_START) < text.index(CPU_END)
