"""tools/gpu_plan/dali_transfer.py with a small stand-in wheel that installs `nvidia.dali`: split into parts,
received in any order (one twice) under a landing folder, joined, checked and installed so that a
python with the folder on PYTHONPATH imports that nvidia.dali; damaged and missing parts are named.
The real download (nvidia-dali-cuda130, 199 MB) is not repeated here."""

import base64
import hashlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools.gpu_plan import dali_transfer
from tools.gpu_plan import plan as gpu_plan

ROOT = Path(__file__).resolve().parents[3]
METADATA = """Metadata-Version: 2.1
Name: {name}
Version: {version}
{requires}"""
DALI_REQUIRES = ["astunparse<=1.6.3,>=1.6.0", "numpy", "nvidia-nvimgcodec-cu13[all]<0.10.0,>=0.9.0",
                 "nvidia-libnvcomp-cu13==5.3.0.16", "tinydep", "pytest", 'sphinx; extra == "doc"']


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires=()) -> Path:
    """A py3-none-any wheel pip installs: files, METADATA, WHEEL and a RECORD with sha256s."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": METADATA.format(
        name=name, version=version, requires="".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def wheels(tmp_path):
    """The stand-in DALI wheel (with 300 KB of payload, for several parts) and two dependency wheels,
    one this python already has (pytest)."""
    folder = tmp_path / "download"
    folder.mkdir()
    payload = random.Random(0).randbytes(300_000)
    dali = make_wheel(folder, "nvidia-dali-cuda130", "9.9.9", {
        "nvidia/dali/__init__.py": b"__version__ = '9.9.9'\n", "nvidia/dali/payload.bin": payload}, DALI_REQUIRES)
    deps = [make_wheel(folder, "tinydep", "1.0", {"tinydep.py": b"VALUE = 42\n"}),
            make_wheel(folder, "pytest", "0.0.1", {"pytest_shadow.py": b""})]
    return dali, deps


def parts(wheels, tmp_path, size=70_000) -> Path:
    dali, deps = wheels
    out = tmp_path / "dali-wheel"
    dali_transfer.split(dali, deps, out, size, "nvidia-dali-cuda130==9.9.9")
    return out


def transfer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.gpu_plan.dali_transfer", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_requirements_leave_out_the_decoders_numpy_and_extras(wheels):
    assert dali_transfer.requirements(wheels[0]) == ["astunparse<=1.6.3,>=1.6.0", "tinydep", "pytest"]


@pytest.mark.parametrize("wheel, deps, room", [(199_000_000, 6_000_000, 55 * 2**20), (100, 0, 100), (1000, 90, 100),
                                                (12_345, 7, 1_000)])
def test_parts_are_equal_and_each_fits_one_command(wheel, deps, room):
    size = dali_transfer.part_bytes(wheel, deps, room)
    count = -(-wheel // size)
    assert size <= room and (wheel - (count - 1) * size) + deps <= room  # the last part carries the dependencies
    assert count == 1 or -(-wheel // (count - 1)) + deps > room  # one part fewer would not fit
    with pytest.raises(dali_transfer.TransferError, match="no room"):
        dali_transfer.part_bytes(wheel, room, room)


def test_parts_received_in_any_order_install_an_importable_nvidia_dali(wheels, tmp_path):
    out = parts(wheels, tmp_path)
    manifest = json.loads((out / "part-1" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 5 and manifest["wheel"]["sha256"] == dali_transfer.sha256(wheels[0])
    assert sorted(p.name for p in (out / "part-5" / "deps").iterdir()) == sorted(d.name for d in wheels[1])
    assert not (out / "part-4" / "deps").exists()
    landing = tmp_path / "landing"
    outputs = []
    for index in (3, 1, 5, 1, 2):  # a command run twice keeps one copy
        result = transfer("receive", out / f"part-{index}", "--landing", landing)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "part 1 was already here" in outputs[3]
    assert "here: 1, 2, 3, 5; still to come: 4" in outputs[4]
    missing = transfer("install", "--landing", landing)
    assert missing.returncode == 2 and "part(s) 4 of 5 are not in" in missing.stderr
    assert transfer("receive", out / "part-4", "--landing", landing).stdout.strip().endswith("all here: install next")
    result = transfer("install", "--landing", landing)
    assert result.returncode == 0, result.stderr
    assert f"sha256 {manifest['wheel']['sha256']} as in the manifest" in result.stdout
    assert "dependencies this python lacks: tinydep" in result.stdout  # pytest is here already
    site = landing / "site"
    assert (site / "tinydep.py").is_file() and not (site / "pytest_shadow.py").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    seen = subprocess.run([sys.executable, "-c", "import nvidia.dali, tinydep; print(nvidia.dali.__file__, tinydep.VALUE)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == [str(site / "nvidia" / "dali" / "__init__.py"), "42"]
    assert not (landing / wheels[0].name).exists()  # the joined wheel is removed, the parts kept
    again = transfer("install", "--landing", landing)
    assert again.returncode == 0 and "installed in" in again.stdout and "already" in again.stdout


def test_a_damaged_part_is_named_and_removed(wheels, tmp_path):
    out = parts(wheels, tmp_path)
    landing = tmp_path / "landing"
    for index in range(1, 6):
        transfer("receive", out / f"part-{index}", "--landing", landing)
    data = bytearray((landing / "part-2").read_bytes())
    data[100] ^= 1
    (landing / "part-2").write_bytes(data)
    result = transfer("install", "--landing", landing)
    assert result.returncode == 2 and "part(s) 2 damaged and removed" in result.stderr
    assert not (landing / "part-2").exists() and not (landing / "site").exists()
    # a damaged part folder is refused at the door
    data = bytearray((out / "part-3" / "wheel.part").read_bytes())
    data[0] ^= 1
    (out / "part-3" / "wheel.part").write_bytes(data)
    (landing / "part-3").unlink()
    refused = transfer("receive", out / "part-3", "--landing", landing)
    assert refused.returncode == 2 and "damaged" in refused.stderr and not (landing / "part-3").exists()


def test_parts_of_another_wheel_are_not_joined(wheels, tmp_path):
    out = parts(wheels, tmp_path)
    landing = tmp_path / "landing"
    transfer("receive", out / "part-1", "--landing", landing)
    other = tmp_path / "other"
    other.mkdir()
    dali = make_wheel(other, "nvidia-dali-cuda130", "9.9.8", {"nvidia/dali/__init__.py": b"__version__ = '9.9.8'\n"})
    dali_transfer.split(dali, [], tmp_path / "other-parts", 1_000_000, "nvidia-dali-cuda130==9.9.8")
    result = transfer("receive", tmp_path / "other-parts" / "part-1", "--landing", landing)
    assert result.returncode == 0 and "removed" in result.stdout
    assert sorted(p.name for p in landing.iterdir()) == ["manifest.json", "part-1"]
    assert dali_transfer.sha256(landing / "part-1") == dali_transfer.sha256(dali)


def test_commands_carry_one_part_each_and_refuse_parts_that_no_longer_fit(wheels, tmp_path, monkeypatch, capsys):
    out = parts(wheels, tmp_path)
    assert dali_transfer.main(["commands", "--dir", str(out)]) == 0
    text = capsys.readouterr().out
    carries = re.findall(r'carry \["([^"]+)"\], timeout_s (\d+)', text)
    assert [c[0] for c in carries] == [f"{out}/part-{i}" for i in range(1, 6)]
    assert [int(c[1]) for c in carries] == [dali_transfer.PART_TIMEOUT] * 4 + [600]
    last = text.strip().splitlines()[-1].strip()
    assert last.startswith(f"python3 -m tools.gpu_plan.dali_transfer receive {out}/part-5 && "
                           f"python3 -m tools.gpu_plan.dali_transfer install")
    stage = last.split(" && ")[-1]
    assert stage.startswith("PYTHONPATH=/tmp/preresnet-dali/site python3 -m tools.gpu_plan dali ")
    gpu_plan.build_parser().parse_args(shlex.split(stage.split(" -m tools.gpu_plan ")[1]))
    monkeypatch.setattr(dali_transfer, "checkout_bytes", lambda root=ROOT: 64 * 2**20 - 100_000)
    assert dali_transfer.main(["commands", "--dir", str(out)]) == 2
    assert "no longer fits one command" in capsys.readouterr().err


def test_the_checkout_size_counts_what_travels(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("data/\n")
    (repo / "tracked.txt").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 300)  # travels: not ignored
    (repo / "data").mkdir()
    (repo / "data" / "part").write_bytes(b"z" * 5000)  # ignored: travels only when carried
    (repo / "shared").mkdir()
    (repo / "shared" / "file").write_bytes(b"s" * 70)
    assert dali_transfer.checkout_bytes(repo) == 1000 + 300 + len("data/\n") + 70


def test_documented_transfer_commands_parse():
    """Every `python[3] -m tools.gpu_plan.dali_transfer ...` in tools/gpu_plan/README.md is one the tool accepts."""
    text = (ROOT / "tools" / "gpu_plan" / "README.md").read_text()
    commands = re.findall(r"python3? -m tools\.gpu_plan\.dali_transfer ([^`&\n]+)", text)
    assert {c.split()[0] for c in commands} >= {"prepare", "commands", "receive", "install"}
    for command in commands:
        dali_transfer.build_parser().parse_args(shlex.split(command.split("#")[0]))
