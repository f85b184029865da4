"""eval.py (preresnet/evaluate_cli.py, installed as preresnet-eval) beyond one run folder: data whose
classes differ from the network's, --weights DEFAULT --model, the folder of a --seeds command,
--save-logits, and reading only the test split. The networks are test_weights.py's exported entries
and fabricated run folders (random weights): no training."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_py
from preresnet import evaluate_cli, get_weights, pretrained
from preresnet.data import load_split
from preresnet.sweeps import grid, seed_statistics, write_summary
from tests.test_weights import CLASSES, S0, S1, edit_entry, exported, finished_run, registry  # noqa: F401  (fixtures)

CPU = ["--device", "cpu", "--loader", "torch"]


def evaluate(capsys, *argv) -> tuple[int, str, str]:
    """eval.py's cli in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    status = eval_py.cli([*map(str, argv), *CPU])
    out, err = capsys.readouterr()
    return status, out, err


def evaluate_json(capsys, *argv) -> tuple[dict, str]:
    status, out, err = evaluate(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out), err


def assert_one_line_error(capsys, argv, *fragments) -> None:
    status, out, err = evaluate(capsys, *argv)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("eval.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_data(data_dir: Path, target: Path, renamed: dict | None = None, splits=("train", "test")) -> Path:
    """A copy of data_dir's splits, class folders renamed; its decode caches written, so that stderr
    then holds only what eval.py says."""
    for split in splits:
        for folder in sorted((data_dir / split).iterdir()):
            shutil.copytree(folder, target / split / (renamed or {}).get(folder.name, folder.name))
        load_split("folder", target, split)
    return target


def read_logits(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def test_eval_reads_only_the_test_split(registry, exported, tmp_path, capsys):
    data = copy_data(exported[1], tmp_path / "test-only", splits=("test",))
    report, _ = evaluate_json(capsys, "--weights", S0, "--data-dir", data)
    assert report["test_error"] == get_weights(S0).test_error and report["test_images"] == 24
    assert not (data / "train").exists() and not (data / ".preresnet-cache-train.npz").exists()


def test_classes_in_another_order_are_mapped_onto_the_networks(registry, exported, tmp_path, capsys):
    """The entry names its classes b, a, c, d; a folder holding a's images under b/ and b's under a/
    is then the data the network was trained on, its labels mapped: the same figures and logits."""
    before, _ = evaluate_json(capsys, "--weights", S0, "--save-logits", tmp_path / "before.npz")
    edit_entry(registry, S0, classes=["b", "a", "c", "d"])
    swapped = copy_data(exported[1], tmp_path / "swapped", renamed={"a": "b", "b": "a"})
    after, err = evaluate_json(capsys, "--weights", S0, "--data-dir", swapped, "--save-logits", tmp_path / "after.npz")
    [note] = err.strip().splitlines()
    assert note.startswith("note: swapped ") and "another order" in note and "(b, a, c, d)" in note
    assert after["classes"] == ["b", "a", "c", "d"]
    assert (after["test_error"], after["per_class_accuracy"]) == (before["test_error"], before["per_class_accuracy"])
    assert after["test_loss"] == pytest.approx(before["test_loss"], rel=1e-6)
    old, new = read_logits(tmp_path / "before.npz"), read_logits(tmp_path / "after.npz")
    # the swapped folder's order: its a/ (the images of b), its b/ (those of a), c/, d/
    assert torch.equal(torch.from_numpy(new["logits"]),
                       torch.from_numpy(np.concatenate([old["logits"][6:12], old["logits"][:6], old["logits"][12:]])))
    assert new["labels"].tolist() == [1] * 6 + [0] * 6 + [2] * 6 + [3] * 6
    assert new["classes"].tolist() == ["b", "a", "c", "d"]


def test_data_with_some_of_the_classes_is_scored_on_those(registry, exported, tmp_path, capsys):
    """A folder of two of the entry's four classes (b and d): its images are scored as they are in the
    full data, the logits the same, a prediction of a class it lacks an error; those classes have no
    accuracy. The reference: the full data's logits, restricted to the images of b and d."""
    full, _ = evaluate_json(capsys, "--weights", S0, "--save-logits", tmp_path / "full.npz")
    some = copy_data(exported[1], tmp_path / "some", splits=("test",))
    for name in ("a", "c"):
        shutil.rmtree(some / "test" / name)
    (some / ".preresnet-cache-test.npz").unlink()
    load_split("folder", some, "test")
    report, err = evaluate_json(capsys, "--weights", S0, "--data-dir", some, "--save-logits", tmp_path / "some.npz")
    [note] = err.strip().splitlines()
    assert note.startswith("note: some ") and "2 of the 4 classes" in note and "(b, d)" in note
    saved = read_logits(tmp_path / "full.npz")
    kept = np.isin(saved["labels"], [1, 3])
    expected_error = float((saved["logits"][kept].argmax(1) != saved["labels"][kept]).mean())
    assert report["test_images"] == int(kept.sum()) == 12
    assert report["test_error"] == pytest.approx(expected_error, abs=1e-12)
    assert report["per_class_accuracy"] == [None, full["per_class_accuracy"][1], None, full["per_class_accuracy"][3]]
    assert report["classes"] == list(CLASSES)
    assert np.array_equal(read_logits(tmp_path / "some.npz")["logits"], saved["logits"][kept])
    status, out, _ = evaluate(capsys, "--weights", S0, "--data-dir", some)
    assert status == 0 and "  a     n/a" in out


def test_an_entry_is_evaluated_as_its_error_was_measured(registry, capsys):
    report, _ = evaluate_json(capsys, "--weights", S0)
    assert report["amp"] == "off" and report["precision"].startswith("fp32") and "measured" in report["precision"]
    assert report["test_error"] == get_weights(S0).test_error
    report, _ = evaluate_json(capsys, "--weights", S0, "--amp", "bf16")
    assert report["amp"] == "bf16" and report["precision"].startswith("bf16") and "--amp bf16" in report["precision"]


@pytest.mark.parametrize("source", ["weights", "checkpoint"])
def test_data_with_other_classes_is_one_line(registry, exported, tmp_path, capsys, source):
    other = copy_data(exported[1], tmp_path / "other", renamed={"d": "e"})
    if source == "weights":
        argv = ["--weights", S0]
    else:
        finished_run(tmp_path / "run", exported[1], "normal", 1, 1, 0)
        argv = ["--checkpoint", tmp_path / "run"]
    assert_one_line_error(capsys, [*argv, "--data-dir", other],
                          "the classes of other are not the ones PreResNet-", "it has 'e' and it lacks 'd'",
                          "evaluate it on data with its classes: 'a', 'b', 'c', 'd'")


def test_weights_default_takes_the_network_from_model(registry, capsys):
    edit_entry(registry, S0, test_error=0.5)
    edit_entry(registry, S1, test_error=0.25)  # S1 is then the best entry of PreResNet-20
    report, _ = evaluate_json(capsys, "--weights", "DEFAULT", "--model", "preresnet20")
    assert report["weights"] == S1 == pretrained.resolve_weights("DEFAULT", "normal", 3, 1, None).name
    assert report["recorded_test_error"] == 0.25 and report["model"] == "PreResNet-20"
    report, _ = evaluate_json(capsys, "--weights", S0, "--model", "preresnet20")  # an entry of that network
    assert report["weights"] == S0
    assert_one_line_error(capsys, ["--weights", "DEFAULT"], "--weights DEFAULT is the entry with the lowest test error",
                          "--model NAME (one of preresnet20, preresnet56")
    assert_one_line_error(capsys, ["--weights", "DEFAULT", "--model", "resnet50"], "unknown model 'resnet50'")
    assert_one_line_error(capsys, ["--weights", "DEFAULT", "--model", "preresnet56"], "no weights for PreResNet-56")
    assert_one_line_error(capsys, ["--weights", S0, "--model", "preresnet56"],
                          f"weights {S0} are for PreResNet-20, not preresnet56")
    assert_one_line_error(capsys, ["--checkpoint", "runs/x", "--model", "preresnet20"],
                          "--model names the network of --weights DEFAULT")


@pytest.fixture
def seeds_folder(exported, tmp_path) -> Path:
    """A train.py --seeds 0,1,2 folder: seed-0 and seed-1 hold checkpoints, seed-2 has none yet."""
    folder = tmp_path / "seeds"
    for seed in (0, 1):
        finished_run(folder / f"seed-{seed}", exported[1], "normal", 1, 1, seed)
    write_summary(folder, grid([0, 1, 2], [None], [None]))
    return folder


def test_a_seeds_folder_evaluates_each_run_and_their_statistics(seeds_folder, tmp_path, capsys):
    alone = [evaluate_json(capsys, "--checkpoint", seeds_folder / f"seed-{seed}")[0] for seed in (0, 1)]
    errors = [report["test_error"] for report in alone]
    summary, _ = evaluate_json(capsys, "--checkpoint", seeds_folder)
    assert summary["folder"] == str(seeds_folder)
    assert [run["name"] for run in summary["runs"]] == ["seed-0", "seed-1", "seed-2"]
    for run, report in zip(summary["runs"], alone):
        assert {key: value for key, value in run.items() if key not in ("name", "checkpoint")} == \
            {key: value for key, value in report.items() if key != "checkpoint"}
    assert summary["runs"][2] == {"name": "seed-2", "checkpoint": None}
    assert summary["groups"] == [{"lr": None, "weight_decay": None, "runs": ["seed-0", "seed-1"], "epochs": [2],
                                  "test_error": seed_statistics(errors)}]

    status, out, _ = evaluate(capsys, "--checkpoint", seeds_folder, "--save-logits", tmp_path / "logits.npz")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"PreResNet-8, 3 runs in {seeds_folder}, ") and "(fp32" in lines[0]
    for line, seed, error in zip(lines[1:3], (0, 1), errors):
        assert line.split()[:7] == [f"seed-{seed}", "epoch", "2", "test", "error", f"{100 * error:.2f}%", "test"], line
        assert line.endswith(f"logits {tmp_path / f'logits-seed-{seed}.npz'}")
    assert lines[3].split() == ["seed-2", "no", "checkpoint", "yet"]
    stats = seed_statistics(errors)
    assert lines[4].startswith(f"test error mean {100 * stats['mean']:.2f}% ± {100 * stats['std']:.2f}% (std), median")
    assert lines[4].endswith("over 2 runs at epoch 2") and len(lines) == 5
    assert sorted(path.name for path in tmp_path.glob("logits*")) == ["logits-seed-0.npz", "logits-seed-1.npz"]
    for seed, error in zip((0, 1), errors):
        saved = read_logits(tmp_path / f"logits-seed-{seed}.npz")
        assert float((saved["logits"].argmax(1) != saved["labels"]).mean()) == pytest.approx(error, abs=1e-12)


def test_a_seeds_folder_without_checkpoints_is_one_line(seeds_folder, capsys):
    for seed in (0, 1):
        (seeds_folder / f"seed-{seed}" / "checkpoint.pt").unlink()
    assert_one_line_error(capsys, ["--checkpoint", seeds_folder],
                          f"no run of {seeds_folder} has a checkpoint yet: seed-0, seed-1, seed-2")
    (seeds_folder / "summary.json").write_text("{")
    assert_one_line_error(capsys, ["--checkpoint", seeds_folder], "summary.json is unreadable")


@pytest.mark.parametrize("source", ["weights", "checkpoint"])
def test_save_logits_writes_the_test_splits_logits_labels_and_classes(registry, exported, tmp_path, capsys, source):
    if source == "weights":
        argv = ["--weights", S0]
    else:
        finished_run(tmp_path / "run", exported[1], "normal", 1, 1, 0)
        argv = ["--checkpoint", tmp_path / "run"]
    path = tmp_path / "logits.npz"
    report, _ = evaluate_json(capsys, *argv, "--save-logits", path)
    assert report["logits"] == str(path)
    saved = read_logits(path)
    assert sorted(saved) == ["classes", "labels", "logits"]
    assert saved["logits"].dtype == np.float32 and saved["logits"].shape == (24, len(CLASSES))
    assert saved["labels"].dtype == np.int64 and saved["labels"].tolist() == \
        load_split("folder", exported[1], "test")[0].labels.tolist()
    assert saved["classes"].tolist() == list(CLASSES)
    logits, labels = torch.from_numpy(saved["logits"]), torch.from_numpy(saved["labels"])
    assert float((logits.argmax(1) != labels).double().mean()) == pytest.approx(report["test_error"], abs=1e-12)
    assert float(F.cross_entropy(logits, labels)) == pytest.approx(report["test_loss"], rel=1e-5)
    status, out, _ = evaluate(capsys, *argv, "--save-logits", path)  # the table says where they went
    assert status == 0 and out.splitlines()[-1] == f"logits written to {path}"
    assert_one_line_error(capsys, [*argv, "--save-logits", tmp_path / "missing" / "logits.npz"],
                          f"--save-logits {tmp_path / 'missing' / 'logits.npz'}: folder {tmp_path / 'missing'} does "
                          f"not exist")


def test_the_package_command_is_eval_py(registry, capsys):
    """preresnet-eval (setup.py's console script, preresnet.evaluate_cli:cli) is eval.py under its own name."""
    capsys.readouterr()
    assert evaluate_cli.cli(["--weights", S0, "--json", *CPU]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == get_weights(S0).test_error
    assert evaluate_cli.cli(["--weights", "nope"]) == 2
    assert capsys.readouterr().err.startswith("preresnet-eval: error: unknown weights 'nope'")
    with pytest.raises(SystemExit) as exited:
        evaluate_cli.cli([])
    assert exited.value.code == 2 and capsys.readouterr().err.startswith("preresnet-eval: error: one of the arguments")
    assert eval_py.build_parser is evaluate_cli.build_parser and eval_py.main is evaluate_cli.main
