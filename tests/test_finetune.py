"""train.py --init: a new run (new optimizer, new schedule, epoch 0) that starts from a registry
entry, a state_dict file or a train.py run, with the finetune recipe unless another is named, the
weights' normalisation, and the head matched to the data's classes by name (re-initialised where the
weights do not classify them); the record in config.json, the checkpoint and the card; resume
continues without loading them again."""

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from preresnet import UserError, build_model, export, pretrained
from preresnet.data import channel_mean_std, load_dataset
from preresnet.finetune import load_init_weights, resolve_init
from preresnet.recipes import RECIPES
from tests.test_cli import CLASSES, TINY, assert_one_line_error, load_weights, make_dataset, run

ENTRY = "preresnet8-shapes-test"
# lr 0 leaves every parameter where --init put it (BatchNorm's running statistics still move)
FROZEN = ["--epochs", "1", "--lr", "0", "--warmup-lr", "0"]
HEAD_KEYS = ("fc.weight", "fc.bias")


def parameters(state: dict) -> dict:
    return {key: value.float() for key, value in state.items() if "running_" not in key and "num_batches" not in key}


def assert_same(state: dict, reference: dict, keys) -> None:
    for key in keys:
        assert torch.equal(state[key].float(), reference[key].float()), key


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def three_classes(data_dir, tmp_path_factory) -> Path:
    """The shapes less one class (cross, the second): data for weights of another class count."""
    folder = tmp_path_factory.mktemp("three") / "shapes3"
    shutil.copytree(data_dir, folder, ignore=shutil.ignore_patterns("cross", ".*"))
    load_dataset("folder", folder)  # its decode cache, as make_dataset writes one
    return folder


@pytest.fixture(scope="module")
def renamed_class(data_dir, tmp_path_factory) -> Path:
    """The four shapes with circle/ renamed zcircle/: as many classes as the weights, other names, and
    every label shifted (the classes are sorted: cross, square, stripes, zcircle)."""
    folder = tmp_path_factory.mktemp("renamed") / "shapes-renamed"
    shutil.copytree(data_dir, folder, ignore=shutil.ignore_patterns(".*"))
    for split in ("train", "test"):
        (folder / split / "circle").rename(folder / split / "zcircle")
    load_dataset("folder", folder)
    return folder


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory) -> Path:
    """A finished PreResNet-8 run on the four shapes: weights to start from."""
    out = tmp_path_factory.mktemp("runs") / "source"
    run("train.py", *TINY, "--epochs", "1", "--out", out, data_dir=data_dir, check=True)
    return out


@pytest.fixture(scope="module")
def registry(source_run, data_dir, tmp_path_factory):
    """A registry holding the source run as ENTRY, as $PRERESNET_WEIGHTS_DIR (for the subprocesses too)."""
    folder = tmp_path_factory.mktemp("registry")
    export.export(source_run, folder, ENTRY, data="four shapes (a test)", data_dir=str(data_dir), device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(pretrained.ENV_VAR, str(folder))
        yield folder


@pytest.fixture(scope="module")
def from_entry(registry, three_classes, tmp_path_factory):
    """A run on three classes started from the four-class entry (DEFAULT: the network's best)."""
    out = tmp_path_factory.mktemp("runs") / "from-entry"
    result = run("train.py", *TINY, *FROZEN, "--init", "DEFAULT", "--out", out, data_dir=three_classes, check=True)
    return out, result.stderr


def test_init_from_an_entry_takes_the_rows_of_the_datas_classes_and_the_weights_normalisation(from_entry, three_classes):
    """Three of the entry's four classes: the head keeps the entry's rows of circle, square and
    stripes (rows 0, 2 and 3 of circle, cross, square, stripes), everything else is the entry's, the
    inputs are normalised with the entry's mean and std (not the three classes' own), and the recipe
    is finetune (no warm-up)."""
    out, stderr = from_entry
    entry = pretrained.get_weights(ENTRY)
    [line] = [line for line in stderr.splitlines() if line.startswith("init: ")]
    for fragment in (f"entry {ENTRY}", "head (fc) loaded", "3 classes", "classify 4", "the weights' mean and std"):
        assert fragment in line, (fragment, line)
    config = json.loads((out / "config.json").read_text())
    init = config["init"]
    assert init == {"source": "DEFAULT", "kind": "registry", "entry": ENTRY, "sha256": entry.meta["sha256"],
                    "network": "PreResNet-8", "architecture": ["normal", 1, 1], "num_classes": 4,
                    "classes": list(CLASSES), "mean": entry.meta["mean"], "std": entry.meta["std"],
                    "head": "loaded", "head_rows": [0, 2, 3]}
    assert (config["mean"], config["std"]) == (entry.meta["mean"], entry.meta["std"])
    assert (config["mean"], config["std"]) != tuple(channel_mean_std(load_dataset("folder", three_classes).train.images))
    assert config["recipe_name"] == "finetune" and config["recipe"]["warmup_iters"] == 0
    trained, weights = load_weights(out), entry.get_state_dict()
    assert trained["epoch"] == 1 and trained["config"]["init"] == init  # the checkpoint carries it for resume
    assert_same(trained["model"], weights, [key for key in parameters(weights) if not key.startswith("fc.")])
    rows = [CLASSES.index(name) for name in ("circle", "square", "stripes")]
    for key in ("fc.weight", "fc.bias"):
        assert torch.equal(trained["model"][key], weights[key][rows].float()), key


def test_init_onto_classes_of_other_names_reinitialises_the_head(source_run, renamed_class, tmp_path):
    """As many classes as the weights but one of another name: every label means another class than
    the head's row of that number, so the head keeps the initialisation of the run's seed (loading it
    as it is would start from a head that is wrong for every image)."""
    out = tmp_path / "renamed"
    result = run("train.py", *TINY, *FROZEN, "--init", source_run, "--out", out, data_dir=renamed_class, check=True)
    [line] = [line for line in result.stderr.splitlines() if "head (fc)" in line]
    assert "re-initialised" in line and "'zcircle'" in line
    init = json.loads((out / "config.json").read_text())["init"]
    assert (init["head"], init["head_rows"], init["classes"]) == ("re-initialised", None, list(CLASSES))
    torch.manual_seed(0)  # the run's seed: its network is built first thing
    fresh = build_model("normal", 1, num_classes=4).state_dict()
    trained, weights = load_weights(out)["model"], load_weights(source_run)["model"]
    assert_same(trained, fresh, HEAD_KEYS)
    assert_same(trained, weights, [key for key in parameters(weights) if not key.startswith("fc.")])


def test_a_named_recipe_replaces_the_finetune_recipe(source_run, data_dir, tmp_path):
    out = tmp_path / "paper"
    run("train.py", *TINY, *FROZEN, "--recipe", "paper", "--init", source_run, "--out", out, data_dir=data_dir,
        check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["recipe_name"] == "paper" and config["recipe"]["warmup_iters"] == 2  # 400 x 1/164, scaled
    assert RECIPES["finetune"].warmup_iters == 0


def test_the_card_and_the_train_command_name_the_weights_started_from(from_entry, tmp_path):
    out, _ = from_entry
    entry = export.export(out, tmp_path, "preresnet8-shapes3-test", data="three shapes", data_dir="shapes3",
                          device="cpu")
    card = (tmp_path / "preresnet8-shapes3-test.md").read_text()
    assert f"| fine-tuned from | PreResNet-8 weights of entry `{ENTRY}` (sha256 `" in card
    assert "classifier head loaded |" in card
    words = shlex.split(entry.meta["commands"]["train"])
    assert words[words.index("--init") + 1] == ENTRY  # the entry itself: DEFAULT may name another one later
    # a network of as many units per stage as a papers' total depth was trained with --units
    config = {**json.loads((out / "config.json").read_text()), "depth": 110}
    assert "--type normal --units 110 " in export.train_command(config, "shapes3")


def test_init_from_a_run_loads_its_head_and_resume_does_not_load_it_again(source_run, data_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(source_run, source)
    out = tmp_path / "tuned"
    command = [*TINY, *FROZEN, "--init", source, "--out", out]
    result = run("train.py", *command, data_dir=data_dir, check=True)
    assert "classifier head (fc) loaded" in result.stderr
    init = json.loads((out / "config.json").read_text())["init"]
    assert (init["kind"], init["path"], init["head"]) == ("checkpoint", str(source / "checkpoint.pt"), "loaded")
    weights = load_weights(source_run)["model"]
    assert_same(load_weights(out)["model"], weights, parameters(weights))
    # the weights are gone; the same command line continues the run from its own checkpoint
    shutil.rmtree(source)
    resumed = run("train.py", *command, "--epochs", "2", "--resume", "auto", data_dir=data_dir, check=True)
    assert "resuming after epoch 1" in resumed.stderr and "init:" not in resumed.stderr
    assert load_weights(out)["epoch"] == 2 and load_weights(out)["config"]["init"] == init


def test_init_refuses_weights_of_another_network_and_a_resumed_run(source_run, data_dir, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(build_model("normal", 2, num_classes=4).state_dict(), other)
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    cases = [
        (["--depth", "2", "--init", source_run], ["holds a PreResNet-8 (its checkpoint's config)", "PreResNet-14"]),
        (["--init", other], [f"--init {other} does not fit PreResNet-8"]),
        (["--init", text], [f"cannot read --init {text}"]),
        (["--init", tmp_path / "missing"], ["does not exist", "registry"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run("train.py", *TINY, *args, "--out", tmp_path / "refused", data_dir=data_dir),
                              *fragments)
    assert_one_line_error(run("train.py", "--resume", source_run, "--init", other), "--init starts a new run",
                          "--resume continues a run")


def test_a_state_dict_of_the_same_classes_loads_whole_and_is_checked_again_at_the_start(tmp_path):
    """Without subprocesses: wrapper prefixes (DistributedDataParallel, torch.compile) are dropped; a
    file that changed between the set-up and the start of the run is refused."""
    torch.manual_seed(1)
    weights = build_model("wide", 1, 2, num_classes=5).state_dict()
    path = tmp_path / "wrn.pt"
    torch.save({f"module._orig_mod.{key}": value for key, value in weights.items()}, path)
    five, seven = list("abcde"), list("abcdefg")
    init = resolve_init(str(path), "wide", 1, 2, five)
    # a bare state_dict names no classes and no normalisation: a head of the data's class count is kept as it is
    assert (init["kind"], init["head"], init["head_rows"], init["num_classes"], init["network"]) == \
        ("state_dict", "loaded", [0, 1, 2, 3, 4], 5, "WRN-10-2")
    assert (init["classes"], init["mean"], init["std"]) == (None, None, None)
    model = build_model("wide", 1, 2, num_classes=5)
    load_init_weights(model, init)
    assert_same(model.state_dict(), weights, weights)
    assert resolve_init(str(path), "wide", 1, 2, seven)["head"] == "re-initialised"
    with pytest.raises(UserError, match="does not fit WRN-10-1"):
        resolve_init(str(path), "wide", 1, 1, five)
    torch.save(build_model("wide", 1, 2, num_classes=5).state_dict(), path)
    with pytest.raises(UserError, match="changed since the run was set up"):
        load_init_weights(build_model("wide", 1, 2, num_classes=5), init)
