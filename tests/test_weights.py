"""The pretrained-weights registry (preresnet/pretrained.py): export of finished runs, loading
through get_model / build_model / torch.hub / eval.py, one-line errors for every bad entry, cards."""

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import preresnet
from preresnet import UserError, build_model, export, get_model, get_weights, list_weights, pretrained
from preresnet.data import load_dataset, load_split
from preresnet.loaders import build_loader
from preresnet.recipes import Recipe, resolve_recipe
from preresnet.run_setup import prepare_config
from preresnet.runfiles import CHECKPOINT_FORMAT, load_checkpoint
from tests.test_data import pil_resized

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c", "d")
DATA = "four classes of noise (a test)"
RUNTIME = {"device": "cpu", "amp": "off", "channels_last": True, "compile": False, "loader": "torch", "fused": False,
           "sync_bn": False, "cuda_graphs": False, "processes": 1}
S0, S1, P8 = "preresnet20-noise-paper-cpu-s0", "preresnet20-noise-paper-cpu-s1", "preresnet8-noise-paper-cpu-s0"
# the entries the module's registry holds: name -> (type, depth, width, seed, state_dict key prefix)
ENTRIES = {
    S0: ("normal", 3, 1, 0, ""),
    S1: ("normal", 3, 1, 1, ""),
    # saved through DistributedDataParallel and torch.compile: the export strips both prefixes
    P8: ("normal", 1, 1, 0, "module._orig_mod."),
}

# the registry this checkout ships, and its entries
REGISTRY = Path(preresnet.__file__).parent / "weights"
COMMITTED = sorted(path.stem for path in REGISTRY.glob("*.json"))


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 6)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def finished_run(folder: Path, data_dir: Path, type: str, depth: int, width: int, seed: int, prefix: str = "",
                 epoch: int = 2) -> torch.nn.Module:
    """A run folder as train.py leaves it after 2 epochs (randomly initialised weights); returns the model."""
    torch.manual_seed(seed)
    model = build_model(type, depth, width, num_classes=len(CLASSES))
    config = prepare_config(load_dataset("folder", data_dir), model=model.paper_name, type=type, depth=depth,
                            width=width, dropout=0.0, dataset="folder", data_dir=str(data_dir), recipe_name="paper",
                            seed=seed)
    recipe = asdict(resolve_recipe("paper", epochs=2))
    folder.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "recipe": recipe, "epoch": epoch, "iteration": 8,
                "position": None, "model": {prefix + key: value for key, value in model.state_dict().items()},
                "optimizer": {}, "scaler": None, "metrics": {"epoch": epoch, "test_error": 0.625}},
               folder / "checkpoint.pt")
    (folder / "config.json").write_text(json.dumps({**config, "recipe": recipe, "runtime": RUNTIME}))
    (folder / "commands.jsonl").write_text(json.dumps({  # one command trained it (preresnet/provenance.py)
        "argv": ["train.py", "--type", type, "--depth", str(depth)], "commit": "abc1234", "device": "CPU (test)",
        "threads": 2, "amp": "off", "channels_last": True, "compile": False, "epochs": [1, epoch],
        "train_seconds": 12.0, "wall_seconds": 20.0}) + "\n")
    Image.new("RGB", (8, 8)).save(folder / "curves.png")
    return model


def rounded(model: torch.nn.Module) -> torch.nn.Module:
    """model with its parameters rounded as the export stores them (bf16), in eval mode."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A registry of three exported entries; returns (registry, data_dir, {name: source model rounded})."""
    root = tmp_path_factory.mktemp("weights")
    data_dir = make_data(root / "data")
    registry = root / "registry"
    models = {}
    for name, (type, depth, width, seed, prefix) in ENTRIES.items():
        run = root / "runs" / name
        models[name] = rounded(finished_run(run, data_dir, type, depth, width, seed, prefix))
        export.export(run, registry, name, data=DATA, data_dir=str(data_dir), device="CPU (test)", commit="abc1234",
                      source=f"runs/{name}")
    return registry, data_dir, models


@pytest.fixture
def registry(exported, tmp_path, monkeypatch) -> Path:
    """A copy of the exported registry that a test may change, as the registry ($PRERESNET_WEIGHTS_DIR)."""
    copy = shutil.copytree(exported[0], tmp_path / "registry")
    monkeypatch.setenv(pretrained.ENV_VAR, str(copy))
    return copy


def edit_entry(registry: Path, entry: str, **changes) -> None:
    path = registry / f"{entry}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_file(registry: Path, name: str, content) -> None:
    """Give the entry a file holding content, its name and sha256 consistent with the entry."""
    meta = json.loads((registry / f"{name}.json").read_text())
    (registry / meta["file"]).unlink()
    tmp = registry / "tmp.pt"
    torch.save(content, tmp)
    sha256 = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(registry / f"{name}-{sha256[:8]}.pt")
    edit_entry(registry, name, sha256=sha256, file=f"{name}-{sha256[:8]}.pt")


def test_export_writes_a_plain_state_dict_and_the_facts(exported):
    registry, data_dir, _ = exported
    assert sorted(p.name for p in registry.iterdir() if not p.name.endswith(".pt")) == sorted(
        f"{name}{suffix}" for name in ENTRIES for suffix in (".json", ".md", "-curves.png"))
    assert sorted(p.name for p in registry.glob("*.pt")) == sorted(
        json.loads((registry / f"{name}.json").read_text())["file"] for name in ENTRIES)
    for name, (type, depth, width, seed, _) in ENTRIES.items():
        meta = json.loads((registry / f"{name}.json").read_text())
        assert sorted(meta) == sorted(pretrained.REQUIRED)
        file = registry / meta["file"]
        sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
        assert meta["sha256"] == sha256 and meta["file"] == f"{name}-{sha256[:8]}.pt" and meta["bytes"] == file.stat().st_size
        state = torch.load(file, map_location="cpu", weights_only=True)
        assert list(state) == list(build_model(type, depth, width).state_dict())  # no module./_orig_mod. prefixes
        assert all(value.dtype == (torch.float32 if "running_" in key else torch.int64 if "num_batches" in key
                                   else torch.bfloat16) for key, value in state.items())
        config = load_checkpoint(registry.parent / "runs" / name)["config"]
        assert meta["model"] == ("preresnet20" if depth == 3 else None)
        assert (meta["network"], meta["num_classes"], meta["classes"], meta["seed"], meta["epochs"]) == \
            (config["model"], 4, list(CLASSES), seed, 2)
        assert meta["data"] == {"description": DATA, "dataset": "folder", "data_dir": str(data_dir)}
        assert (meta["mean"], meta["std"]) == (config["mean"], config["std"])
        assert meta["recipe"] == "paper" and meta["recipe_settings"]["epochs"] == 2
        assert (meta["device"], meta["commit"], meta["torch"], meta["source"]) == \
            ("CPU (test)", "abc1234", torch.__version__, f"runs/{name}")
        assert meta["test_images"] == 24 and len(meta["per_class_accuracy"]) == 4
        # the command that trained it, from the run's commands.jsonl, and the card's table of it
        [command] = meta["trained_by"]
        assert command["epochs"] == [1, 2] and command["amp"] == "off" and command["argv"][0] == "train.py"
        assert "## How it was trained" in (registry / f"{name}.md").read_text()
        assert meta["training_test_error"] == 0.625 and meta["measured"] == {"device": "cpu", "precision": "fp32"}
        assert meta["commands"]["evaluate"] == f"python eval.py --weights {name} --data-dir {data_dir}"


def test_get_model_and_build_model_return_the_weights_in_eval_mode(registry, exported):
    models = exported[2]
    x = torch.randn(3, 3, 32, 32)
    for model in (get_model("preresnet20", weights=S0),
                  get_model("preresnet20", weights=get_weights(S0)),
                  build_model("normal", 3, weights=S0)):
        assert not model.training and model.fc.out_features == 4 and model.fc.weight.dtype == torch.float32
        torch.testing.assert_close(model(x), models[S0](x), rtol=0, atol=0)
    # a network outside list_models() loads through build_model
    model = build_model("normal", 1, weights=P8)
    torch.testing.assert_close(model(x), models[P8](x), rtol=0, atol=0)


def test_fused_networks_load_the_same_weights(registry):
    pytest.importorskip("triton")
    unfused = get_model("preresnet20", weights=S1)
    fused = get_model("preresnet20", weights=S1, fused=True)
    assert fused.fused and not fused.training
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), unfused.state_dict().values()))


def test_default_is_the_entry_with_the_lowest_test_error(registry):
    assert list_weights() == sorted(ENTRIES)
    assert list_weights("preresnet20") == [S0, S1]
    assert list_weights("preresnet56") == []
    for errors, best in (((0.3, 0.2), S1), ((0.2, 0.3), S0), ((0.2, 0.2), S0)):  # a tie: the first name
        for seed, error in enumerate(errors):
            edit_entry(registry, (S0, S1)[seed], test_error=error)
        assert pretrained.resolve_weights("DEFAULT", "normal", 3, 1, None).name == best
    model = get_model("preresnet20", weights="DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), get_model(
        "preresnet20", weights=S0).state_dict().values()))


def flip_a_byte(registry):
    file = registry / get_weights(S0).meta["file"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(registry):
    file = registry / get_weights(S0).meta["file"]
    file.write_bytes(file.read_bytes()[:1000])


@pytest.mark.parametrize("change, call, fragments", [
    (None, lambda: get_model("preresnet20", weights="nope"), ["unknown weights 'nope'", S0]),
    (None, lambda: get_model("preresnet20", weights=f"../registry/{S0}"), ["unknown weights"]),
    (None, lambda: get_model("preresnet56", weights="DEFAULT"), ["no weights for PreResNet-56", S0]),
    (None, lambda: get_model("preresnet56", weights=S0), [f"weights {S0} are for PreResNet-20, not PreResNet-56"]),
    (None, lambda: get_model("preresnet20", weights=S0, num_classes=10), ["classify 4 classes, not num_classes=10"]),
    (None, lambda: get_model("preresnet20", weights=3), ["weights must be None, 'DEFAULT'"]),
    (None, lambda: list_weights("resnet50"), ["unknown model 'resnet50'"]),
    (flip_a_byte, lambda: get_model("preresnet20", weights=S0), [f"{S0}-", "is damaged"]),
    (truncate, lambda: get_model("preresnet20", weights=S0), ["is damaged"]),
    (lambda r: (r / get_weights(S0).meta["file"]).unlink(), lambda: get_model("preresnet20", weights=S0), ["is missing"]),
    (lambda r: replace_file(r, S0, [1, 2, 3]), lambda: get_model("preresnet20", weights=S0),
     ["does not hold a state_dict"]),
    (lambda r: replace_file(r, S0, build_model("normal", 3).state_dict()), lambda: get_model("preresnet20", weights=S0),
     ["does not fit PreResNet-20", "size mismatch for fc.weight"]),
    (lambda r: (r / f"{S0}.json").write_text("{"), lambda: list_weights(), [f"{S0}.json is unreadable"]),
    (lambda r: edit_entry(r, S0, name="other"), lambda: get_weights(S0), [f"{S0}.json is inconsistent"]),
], ids=["unknown", "path", "no-default", "other-network", "num-classes", "not-a-name", "unknown-model", "flipped-byte",
        "truncated", "missing", "not-a-state-dict", "does-not-fit", "unreadable-json", "inconsistent-json"])
def test_bad_weights_are_one_line_errors(registry, change, call, fragments):
    if change:
        change(registry)
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_export_refuses_an_unfinished_run_and_a_bad_name(exported, tmp_path):
    run = tmp_path / "run"
    finished_run(run, exported[1], "normal", 1, 1, 0, epoch=1)
    with pytest.raises(UserError, match="at epoch 1 of 2: only a finished run's last epoch becomes weights"):
        export.export(run, tmp_path / "registry", "x", data=DATA, data_dir="d", device="cpu")
    with pytest.raises(UserError, match="entry name 'DEFAULT'"):
        export.export(run, tmp_path / "registry", "DEFAULT", data=DATA, data_dir="d", device="cpu")
    with pytest.raises(UserError, match="needs --name, --data, --data-dir"):
        export.main(export.build_parser().parse_args([str(run)]))
    assert not (tmp_path / "registry").exists()


def test_weights_are_not_a_checkpoint_to_resume(exported):
    with pytest.raises(UserError, match="not a checkpoint written by this project's train.py: it holds bare weights .*"
                                        "nothing to resume"):
        load_checkpoint(next(exported[0].glob(f"{S0}-*.pt")))


def test_transforms_take_what_torchvision_transforms_take(registry, exported):
    entry = get_weights(S0)
    images = load_dataset("folder", exported[1]).test.images  # N x 32 x 32 x 3 uint8, as the datasets hold them
    loader = build_loader(images, np.zeros(len(images), dtype=np.int64), batch_size=len(images), train=False,
                          backend="torch", mean=entry.meta["mean"], std=entry.meta["std"])
    batch = next(iter(loader))[0]
    normalize = entry.transforms()
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 CHW is what torchvision.io.decode_image gives
    # uint8 in every layout and container: the loader's batch bit for bit; one image gives CHW
    for given, expected in ((torch.from_numpy(images), batch), (images, batch), (nchw, batch),
                            (nchw.contiguous(), batch), (torch.from_numpy(images[0]), batch[0]), (images[0], batch[0]),
                            (nchw[0].contiguous(), batch[0]), (Image.fromarray(images[0]), batch[0])):
        normalized = normalize(given)
        assert normalized.dtype == torch.float32 and normalized.is_contiguous()
        assert torch.equal(normalized, expected), type(given)
    # float in [0, 1], CHW as ToTensor gives it, or HWC
    for given, expected in ((nchw / 255.0, batch), (nchw[0] / 255.0, batch[0]), (images / np.float32(255), batch),
                            (torch.from_numpy(images[0]) / 255.0, batch[0])):
        torch.testing.assert_close(normalize(given), expected, rtol=0, atol=1e-5)
    # one image, as torchvision's transforms return it, is a batch of one for the network
    model = get_model("preresnet20", weights=S0)
    torch.testing.assert_close(model(normalize(Image.fromarray(images[0])).unsqueeze(0)), model(batch[:1]))


def test_transforms_resize_other_sizes_as_torchvision_and_the_folder_loader_do(registry, tmp_path):
    """Another size than 32x32 is resized and centre-cropped as torchvision's Resize(32) and
    CenterCrop(32) do (PIL's antialiased bilinear: within one level of its rounding), for every input
    form; the image folder loader gives the very same batch for the same image file; a PIL image of
    another mode is converted to RGB, as ImageFolder loads it."""
    entry = get_weights(S0)
    transform = entry.transforms()
    mean, std = torch.tensor(entry.meta["mean"])[:, None, None], torch.tensor(entry.meta["std"])[:, None, None]
    one_level = 1.01 / (255 * float(std.min()))
    rng = np.random.default_rng(3)
    for height, width in ((64, 64), (40, 70), (96, 48), (16, 16)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        reference = (torch.from_numpy(pil_resized(image).copy()).permute(2, 0, 1) / 255.0 - mean) / std
        chw = torch.from_numpy(image).permute(2, 0, 1)
        for given in (image, Image.fromarray(image), chw, chw / 255.0, torch.from_numpy(image)[None]):
            out = transform(given)
            out = out[0] if out.dim() == 4 else out
            assert out.shape == (3, 32, 32)
            torch.testing.assert_close(out, reference, rtol=0, atol=one_level)
        folder = tmp_path / f"{height}x{width}"
        (folder / "test" / "a").mkdir(parents=True)
        Image.fromarray(image).save(folder / "test" / "a" / "0.png")
        split, _ = load_split("folder", folder, "test")
        loader = build_loader(split.images, split.labels, batch_size=1, train=False, backend="torch",
                              mean=entry.meta["mean"], std=entry.meta["std"])
        assert torch.equal(next(iter(loader))[0][0], transform(Image.fromarray(image)))
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    assert torch.equal(transform(Image.fromarray(gray)), transform(np.stack([gray] * 3, axis=-1)))
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    assert torch.equal(transform(Image.fromarray(rgba)), transform(rgba[..., :3].copy()))


@pytest.mark.parametrize("images, fragments", [
    (torch.full((3, 32, 32), 255.0), ["float images must be in [0, 1]", "from 255 to 255", "divide 0-255 images by 255"]),
    (torch.full((2, 3, 32, 32), -0.5), ["float images must be in [0, 1]", "from -0.5"]),
    (torch.full((3, 32, 32), float("nan")), ["float images must be in [0, 1]"]),
    (np.full((32, 32, 3), 200.0), ["float images must be in [0, 1]"]),
    (torch.zeros(3, 32, 3, dtype=torch.uint8), ["shape (3, 32, 3)", "both the last and the third-from-last axis"]),
    (torch.zeros(32, 32, dtype=torch.uint8), ["shape (32, 32) has no channel axis of 3"]),
    (np.zeros((32, 32, 4), dtype=np.uint8), ["shape (32, 32, 4) has no channel axis of 3"]),
    (torch.zeros(3, 32, 32, dtype=torch.int64), ["uint8 (0-255) or float in [0, 1], got torch.int64"]),
    (np.array([["a"]]), ["got a numpy array of <U1"]),
    ([[0, 1]], ["a PIL image, a numpy array or a tensor, got list"]),
], ids=["float-0-255", "negative", "nan", "numpy-float-0-255", "ambiguous", "gray-tensor", "rgba-array", "int64",
        "strings", "list"])
def test_transforms_refuse_what_they_cannot_normalise(registry, images, fragments):
    with pytest.raises(UserError) as raised:
        get_weights(S0).transforms()(images)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def load_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_hub_loads_the_weights_from_a_checkout(registry):
    hubconf = load_hubconf()
    # what pretrained.py imports that torch does not install: numpy
    assert hubconf.dependencies == ["torch", "numpy"]
    # the entry points torch.hub.list reports (it reads GitHub only): the public callables of hubconf
    assert sorted(name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")) == \
        sorted([*preresnet.list_models(), "get_weight", "list_weights"])
    assert "weights" in hubconf.preresnet20.__doc__ and "PreResNet-20" in hubconf.preresnet20.__doc__
    model = torch.hub.load(str(ROOT), "preresnet20", source="local", weights=S0)
    expected = get_model("preresnet20", weights=S0)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert torch.hub.load(str(ROOT), "wrn16_4", source="local", num_classes=7).fc.out_features == 7


def test_torch_hub_gives_the_entries_meta_and_transforms(registry, exported):
    """As torchvision's hub: get_weight returns the entry (meta, transforms, state_dict), list_weights its names."""
    entry = torch.hub.load(str(ROOT), "get_weight", S1, source="local")
    assert entry == get_weights(S1) and entry.meta["test_error"] == get_weights(S1).test_error
    assert torch.hub.load(str(ROOT), "get_weight", "DEFAULT", model_name="preresnet20", source="local") == \
        pretrained.resolve_weights("DEFAULT", "normal", 3, 1, None)
    assert torch.hub.load(str(ROOT), "list_weights", model_name="preresnet20", source="local") == [S0, S1]
    model = torch.hub.load(str(ROOT), "preresnet20", source="local", weights=S1)
    images = load_dataset("folder", exported[1]).test.images[:4]
    expected = get_model("preresnet20", weights=S1)(get_weights(S1).transforms()(images))
    torch.testing.assert_close(model(entry.transforms()(images)), expected, rtol=0, atol=0)
    with pytest.raises(UserError, match='"DEFAULT" is the best entry of a network: name the network too'):
        torch.hub.load(str(ROOT), "get_weight", "DEFAULT", source="local")
    with pytest.raises(UserError, match=f"weights {S0} are for PreResNet-20, not preresnet56"):
        torch.hub.load(str(ROOT), "get_weight", S0, "preresnet56", source="local")


@pytest.mark.parametrize("call", [
    lambda: get_model("preresnet20", pretrained=True),
    lambda: build_model("normal", 3, pretrained=True),
    lambda: preresnet.models.preresnet20(pretrained=False),
    lambda: torch.hub.load(str(ROOT), "preresnet20", source="local", pretrained=True),
], ids=["get_model", "build_model", "factory", "hub"])
def test_pretrained_is_answered_with_the_weights_spelling(call):
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and 'there is no pretrained= argument: use weights="DEFAULT"' in message, message
    assert "preresnet.list_weights()" in message and "torchvision" in message


def test_get_model_names_the_arguments_it_takes():
    with pytest.raises(UserError, match=r"get_model\('preresnet20'\) takes num_classes, fused, dropout, weights, not "
                                        r"depth \(its name fixes the network"):
        get_model("preresnet20", depth=5)


def test_python_m_preresnet_pretrained_lists_the_entries(registry):
    def listing(*args):
        return subprocess.run([sys.executable, "-m", "preresnet.pretrained", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    result = listing()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"the registry {registry}:"
    assert lines[1].split() == ["entry", "network", "data", "test", "error", "file", "size"]
    assert len(lines) == 2 + len(ENTRIES)
    for name, line in zip(sorted(ENTRIES), lines[2:]):
        meta = get_weights(name).meta
        assert line.startswith(name + " ")
        for fact in (meta["network"], DATA, f"{100 * meta['test_error']:.2f}%", meta["file"],
                     f"{meta['bytes'] / 2**20:.1f} MiB"):
            assert fact in line, (fact, line)
    only = listing("--model", "preresnet20").stdout.splitlines()
    assert [line.split()[0] for line in only[2:]] == [S0, S1]
    assert listing("--model", "preresnet56").stdout.strip() == \
        f"the registry {registry} holds no weights for preresnet56"
    refused = listing("--model", "resnet50")
    [line] = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "error: unknown model 'resnet50'" in line and "preresnet110" in line


def test_hubconf_imports_only_the_model_code():
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import hubconf; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('preresnet', 'PIL', 'matplotlib', 'triton', 'nvidia'))))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    # the model code: the networks, the registry of their names and the weights registry that
    # get_model(weights=) reads; no image, plotting, kernel or DALI library
    assert json.loads(result.stdout) == ["preresnet", "preresnet.cli", "preresnet.errors", "preresnet.models",
                                         "preresnet.pretrained", "preresnet.registry", "preresnet.wording"]


def test_eval_py_evaluates_an_entry_against_its_recorded_error(registry, capsys):
    import eval as eval_py

    assert eval_py.cli(["--weights", S0, "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = get_weights(S0)
    assert report["weights"] == S0 and report["test_error"] == entry.test_error == report["recorded_test_error"]
    assert report["per_class_accuracy"] == entry.meta["per_class_accuracy"] and report["epoch"] == 2
    assert eval_py.cli(["--weights", S0, "--device", "cpu"]) == 0
    assert f"recorded in {S0}: test error {100 * entry.test_error:.2f}% on 24 test images (fp32 on cpu)" in \
        capsys.readouterr().out
    assert eval_py.cli(["--weights", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("eval.py: error: unknown weights 'nope'")
    for argv, message in ((["--weights", S0, "--checkpoint", "x"], "not allowed with"),
                          ([], "one of the arguments --checkpoint --weights is required")):
        with pytest.raises(SystemExit) as exited:
            eval_py.cli(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def read_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images of data_dir/split/CLASS/*.png with PIL, classes in sorted order: uint8 N x 32 x 32 x 3, labels."""
    images, labels = [], []
    for label, name in enumerate(sorted(p.name for p in (data_dir / split).iterdir())):
        for path in sorted((data_dir / split / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_the_card_states_the_errors_of_the_stored_network(registry, exported):
    """The card's test error and per-class accuracies are those of the stored network on the data's
    test images, computed here without the package's reader, loaders or evaluation: the rounded source
    model (bf16 weights, as stored) on the PNGs read with PIL, normalised with numpy's per-channel
    mean and std of the training PNGs; so are the normalisation the card states and the test loss the
    entry records (the random network predicts nearly one class whatever the input: the loss is what
    tells a wrong input apart). The other figures are the ones export was given. Deleted, the card comes
    back from the registry's JSON alone (export --cards)."""
    _, data_dir, models = exported
    train_images, _ = read_split(data_dir, "train")
    pixels = train_images.reshape(-1, 3) / 255.0
    mean, std = pixels.mean(0).tolist(), pixels.std(0).tolist()
    images, labels = read_split(data_dir, "test")
    x = torch.from_numpy(((images / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = models[S0](x)
    predicted = logits.argmax(1).numpy()
    error = float((predicted != labels).mean())
    loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))
    assert get_weights(S0).meta["test_loss"] == pytest.approx(loss, rel=1e-5)
    accuracies = [float((predicted[labels == c] == c).mean()) for c in range(len(CLASSES))]
    card = (registry / f"{S0}.md").read_text()
    file = registry / get_weights(S0).meta["file"]
    measured = (f"**{100 * error:.2f}%** on {len(labels)} test images",
                *(f"| {cls} | {100 * accuracy:.2f}% |" for cls, accuracy in zip(CLASSES, accuracies)),
                f"mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")
    given = ("| test error in training | 62.50%", f"# {S0}", DATA, "recipe `paper`", "seed 0", "2 epochs",
             "| device | CPU (test) |", "| commit | abc1234 |", f"--data-dir {data_dir}", f'weights="{S0}"')
    for fact in (*measured, *given, file.name, hashlib.sha256(file.read_bytes()).hexdigest()):
        assert fact in card, fact
    assert "torch.hub" not in (registry / f"{P8}.md").read_text()  # PreResNet-8 is no hub entry point
    for path in registry.glob("*.md"):
        path.unlink()
    export.main(export.build_parser().parse_args(["--cards", "--registry", str(registry)]))
    assert (registry / f"{S0}.md").read_text() == card


def test_the_card_names_every_machine_and_commit_that_trained_the_entry(registry):
    """A run continued on other machines (the PreResNet-110 entry: an Intel Xeon, then an AMD EPYC, then the
    Xeon again) names each once, first one first, as the results table does; with no command recorded,
    the device and commit export was told."""
    meta = get_weights(S0).meta
    [command] = meta["trained_by"]
    steps = [("Xeon", "c1"), ("EPYC", "c2"), ("Xeon", "c3"), (None, "c3")]
    commands = [{**command, "device": device, "commit": commit} for device, commit in steps]
    card = export.card({**meta, "trained_by": commands})
    assert "| device | Xeon, then EPYC |" in card and "| commit | c1, c2, c3 |" in card
    alone = export.card({**meta, "trained_by": []})
    assert "| device | CPU (test) |" in alone and "| commit | abc1234 |" in alone


def test_the_train_command_trains_the_same_run(registry):
    from preresnet import run_setup
    from preresnet import train_cli as train

    meta = get_weights(P8).meta
    words = shlex.split(meta["commands"]["train"])
    assert words[:2] == ["python", "train.py"]
    args = train.build_parser().parse_args(words[2:])
    recipe = resolve_recipe(args.recipe, **{name: getattr(args, name) for name in run_setup.RECIPE_FLAGS})
    settings = meta["recipe_settings"]
    assert recipe == Recipe(**{**settings, "milestones": tuple(settings["milestones"])})
    assert run_setup.network(args) == ("normal", 1, 1)
    assert (args.seed, args.dataset, args.data_dir) == (0, "folder", meta["data"]["data_dir"])
    assert (args.device, args.amp, args.loader, args.channels_last, args.compile, args.fused, args.cuda_graphs) == \
        ("cpu", "off", "torch", True, False, False, False)


@pytest.mark.slow
def test_an_installed_package_carries_its_registry(exported, tmp_path):
    """pip install puts the registry's files (setup.py's package_data) where get_model finds them."""
    from tests.test_install import install_copy

    def add_entry(source):
        for path in exported[0].glob(f"{S0}*"):
            shutil.copy2(path, source / "preresnet" / "weights" / path.name)

    target = install_copy(tmp_path, add_entry)
    installed = target / "preresnet" / "weights"
    assert sorted(p.name for p in installed.glob(f"{S0}*")) == sorted(p.name for p in exported[0].glob(f"{S0}*"))
    code = ("import json, preresnet; names = preresnet.list_weights(); "
            "models = [preresnet.get_model(name.split('-')[0], weights=name) for name in names]; "
            "print(json.dumps(names, separators=(',', ':')), preresnet.__file__, any(m.training for m in models))")
    env = {key: value for key, value in os.environ.items() if key != pretrained.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**env, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    listed, location, training = result.stdout.split()
    assert sorted(json.loads(listed)) == sorted([*COMMITTED, S0])  # the checkout's entries, and the one added
    assert (location, training) == (str(target / "preresnet" / "__init__.py"), "False")


@pytest.mark.parametrize("name", COMMITTED)
def test_each_committed_entry_loads_and_agrees_with_its_run(name, tmp_path, monkeypatch):
    """The weights this checkout ships: the file matches its sha256 and loads strictly into the network
    in eval mode, the card is what the facts generate, and the results the table reads hold the same
    errors (the run's last epoch, and the one measured on the file)."""
    monkeypatch.delenv(pretrained.ENV_VAR, raising=False)
    weights = get_weights(name)
    meta = weights.meta
    model = get_model(meta["model"], weights=name)
    assert not model.training and model(torch.zeros(1, 3, 32, 32)).shape == (1, meta["num_classes"])
    assert hashlib.sha256(weights.file.read_bytes()).hexdigest() == meta["sha256"]
    assert weights.file.name == f"{name}-{meta['sha256'][:8]}.pt"
    state = weights.get_state_dict()
    assert all(torch.equal(value.to(state[key].dtype), state[key]) for key, value in model.state_dict().items())
    copy = shutil.copytree(REGISTRY, tmp_path / "registry", ignore=shutil.ignore_patterns("*.md"))
    export.main(export.build_parser().parse_args(["--cards", "--registry", str(copy)]))
    assert (copy / f"{name}.md").read_text() == (REGISTRY / f"{name}.md").read_text()
    assert (REGISTRY / meta["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    source = REGISTRY.parents[1] / meta["source"]
    run = json.loads((source.parent / "run.json").read_text())["runs"][source.name]
    assert run["weights"]["entry"] == name and run["weights"]["test_error"] == meta["test_error"]
    assert run["final_test_error"] == meta["training_test_error"]
    history = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == meta["epochs"] and history[-1]["test_error"] == meta["training_test_error"]
