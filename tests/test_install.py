"""The installed package owns no generic top-level name: the Triton kernels are the subpackage
`preresnet.kernels` (preresnet/kernels/), so the project lives beside the Hugging Face `kernels`
package (imported as `kernels`), from a regular install and from a source checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what an unrelated top-level `kernels` package (such as Hugging Face's) would be
OTHER_KERNELS = "WHO = 'another project'\n"

IMPORTS = """
import importlib, json, sys
kernels = importlib.import_module("kernels")  # the other project's
import preresnet
import preresnet.kernels.layers, preresnet.kernels.dispatch
print(json.dumps({"other": kernels.WHO, "layers": preresnet.kernels.layers.__file__,
                  "tables": [p.name for p in preresnet.kernels.dispatch.TABLE.parent.glob("*.json")],
                  "top_level_kernels": sys.modules["kernels"].__file__}))
"""


def run_python(code: str, cwd: Path, pythonpath: list[Path]) -> dict:
    import json
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def other_kernels(tmp_path) -> Path:
    folder = tmp_path / "elsewhere"
    (folder / "kernels").mkdir(parents=True)
    (folder / "kernels" / "__init__.py").write_text(OTHER_KERNELS)
    return folder


def install_copy(tmp_path: Path, add=None) -> Path:
    """pip install (a regular install, not editable) of a copy of the checkout's package files into
    a folder of its own; add(source) may put more files into the copy first. Returns the folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "preresnet", source / "preresnet", ignore=shutil.ignore_patterns("__pycache__"))
    if add is not None:
        add(source)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def test_a_regular_install_holds_no_top_level_kernels(tmp_path, other_kernels):
    target = install_copy(tmp_path)
    # bin/: pip install --target's folder of console scripts, no package
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "preresnet"]
    assert sorted(p.name for p in (target / "bin").iterdir()) == ["preresnet-eval", "preresnet-train"]
    # imported from outside any checkout, next to another project's `kernels`
    seen = run_python(IMPORTS, cwd=tmp_path, pythonpath=[other_kernels, target])
    assert seen["other"] == "another project"
    assert Path(seen["layers"]).is_relative_to(target / "preresnet" / "kernels")
    assert "conv_paths.json" in seen["tables"]
    # the console scripts setup.py declares, both run from the install
    (dist_info,) = target.glob("preresnet-*.dist-info")
    assert (dist_info / "entry_points.txt").read_text().split() == [
        "[console_scripts]", "preresnet-eval", "=", "preresnet.evaluate_cli:cli", "preresnet-train", "=",
        "preresnet.train_cli:cli"]
    env = {**os.environ, "PYTHONPATH": str(target)}
    usage = subprocess.run([str(target / "bin" / "preresnet-eval"), "--weights", "DEFAULT"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and usage.stderr.startswith("preresnet-eval: error: --weights DEFAULT is the entry"), \
        usage.stderr[-3000:]
    refused = subprocess.run([str(target / "bin" / "preresnet-train"), "--model", "preresnet20", "--depth", "9"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.startswith("preresnet-train: error: --model preresnet20 is "
                                                                 "PreResNet-20 (--depth 3), not --depth 9"), refused.stderr[-3000:]


def test_a_checkout_serves_its_kernels_folder_as_preresnet_kernels(tmp_path, other_kernels):
    """Run from the repository without installing (as on a machine that only has the checkout): preresnet.kernels is the checkout's preresnet/kernels/ folder, and a `kernels`
    package found first on the path is someone else's, untouched."""
    code = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]\n" + IMPORTS
    seen = run_python(code, cwd=tmp_path, pythonpath=[other_kernels, ROOT])
    assert seen["other"] == "another project"
    assert Path(seen["layers"]) == ROOT / "preresnet" / "kernels" / "layers.py"


def test_no_module_imports_the_top_level_name():
    """Every import of the kernels goes through preresnet.kernels (a second copy under the bare name
    would register the custom ops twice)."""
    import re

    offenders = []
    for path in ROOT.glob("**/*.py"):
        if any(part in ("data", "build", ".git") or part.startswith(".venv") for part in path.relative_to(ROOT).parts):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from kernels\b|import kernels\b)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
