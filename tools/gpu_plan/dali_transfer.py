"""NVIDIA DALI for a GPU machine without network: the wheel travels in parts, one part with each
device command (a command takes at most 64 MiB of files along, the checkout included).

    python -m tools.gpu_plan.dali_transfer prepare     # here: download the wheel and its small dependencies, split it
    python -m tools.gpu_plan.dali_transfer commands    # the device commands, checked against this checkout's size
    python3 -m tools.gpu_plan.dali_transfer receive data/dali-wheel/part-N   # there: keep part N under /tmp/preresnet-dali
    python3 -m tools.gpu_plan.dali_transfer install    # there: reassemble, check the sha256, pip install --no-deps

`prepare` downloads nvidia-dali-cuda130 (the CUDA 13 build: the GPU machines run torch 2.11 built for
CUDA 13) for CPython 3.12 on manylinux x86-64, and the dependencies its Python code imports. It leaves
out the image decoders (nvidia-nvimgcodec) and the compression library (nvidia-libnvcomp): the
project's pipeline decodes and decompresses nothing, and DALI loads them only when an operator
needs them. It leaves out numpy too: torch there brings its own, which must not be replaced. The
wheel is cut into equal parts, each small enough to travel with the checkout; the last part also
carries the dependency wheels. Every part folder holds manifest.json: the names, sizes and sha256 of
the wheel, of every part and of every dependency.

On the GPU machine `receive` checks its part's sha256 and keeps it as a file of its own under
/tmp/preresnet-dali/, so a command run twice keeps one copy; `install` checks that every part is
there, joins them, checks the wheel's sha256, and installs it (pip --no-deps --no-index) with the
dependencies the machine lacks into /tmp/preresnet-dali/site, which PYTHONPATH then names. /tmp
survives between commands only while the machine stays warm (about 30 s after each command), so the
part commands follow each other at once. tools/gpu_plan/README.md ("DALI on the GPU") has the commands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from preresnet.runfiles import atomic_write, write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENT = "nvidia-dali-cuda130==2.4.0"
PYTHON_VERSION = "3.12"  # the GPU machines' python3
# the wheel is manylinux_2_28; its dependencies come for older manylinux tags too
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64")
# never brought: the image decoders and compression library (unused by the pipeline), and numpy (torch's)
LEFT_OUT = ("nvidia-nvimgcodec", "nvidia-libnvcomp", "numpy")
PARTS = ROOT / "data" / "dali-wheel"  # data/ is git-ignored: the parts travel only when a command carries one
LANDING = Path("/tmp/preresnet-dali")
CARRY_LIMIT = 64 * 2**20  # what one device command takes along, the checkout included
MARGIN = 2 * 2**20  # for files the checkout gains between prepare and the commands
PART_LIMIT = 55 * 2**20
PART_FILE = "wheel.part"
MANIFEST = "manifest.json"
NVIDIA_INIT = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
STAGE_BUDGET = 420  # seconds for `tools.gpu_plan dali` in the last command, after the install (600 s in all)
PART_TIMEOUT = 120  # timeout_s of a part command: copying and hashing 55 MiB takes seconds


class TransferError(Exception):
    """One line for the user; exit status 2."""


def say(*parts) -> None:
    print("[dali_transfer]", *parts, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def checkout_bytes(root: Path = ROOT) -> int:
    """What travels with every command without being carried: tracked files and untracked files git
    does not ignore (as they are in the working tree), and the folder shared/ where there is one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {root / name for name in listed if name}
    if (root / "shared").is_dir():
        files |= {path for path in (root / "shared").rglob("*")}
    return sum(path.stat().st_size for path in files if path.is_file() and not path.is_symlink())


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines that are brought: not an extra's, not LEFT_OUT."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    wanted = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = line.split(":", 1)[1].strip()
        if "extra ==" in requirement or name_of(requirement).startswith(LEFT_OUT):
            continue
        wanted.append(requirement)
    return wanted


def pip_download(requirements: list[str], folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", PYTHON_VERSION, "--disable-pip-version-check", "-d", str(folder)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    say("$", " ".join(command + requirements))
    result = subprocess.run(command + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        raise TransferError(f"pip download failed: {result.stderr.strip().splitlines()[-1:]}")


def part_bytes(wheel: int, dependencies: int, room: int) -> int:
    """The size of each of the wheel's equal parts, so that every part, the last with the
    dependency wheels, fits into room."""
    if dependencies >= room:
        raise TransferError(f"the dependency wheels ({mib(dependencies)}) alone leave no room in one command")
    count = max(1, math.ceil((wheel + dependencies) / room))
    while math.ceil(wheel / count) + dependencies > room:
        count += 1
    return math.ceil(wheel / count)


def split(wheel: Path, dependencies: list[Path], out: Path, size: int, requirement: str) -> dict:
    """out/part-1 ... part-N, each with its piece of the wheel and the manifest; the last one with
    the dependency wheels in deps/. The folder is built aside and then swapped in."""
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    count = math.ceil(wheel.stat().st_size / size)
    parts = []
    with open(wheel, "rb") as source:
        for index in range(1, count + 1):
            folder = staging / f"part-{index}"
            folder.mkdir(parents=True)
            (folder / PART_FILE).write_bytes(source.read(size))
            parts.append({"index": index, "bytes": (folder / PART_FILE).stat().st_size,
                          "sha256": sha256(folder / PART_FILE)})
    deps_folder = staging / f"part-{count}" / "deps"
    deps_folder.mkdir()
    deps = []
    for path in dependencies:
        shutil.copy2(path, deps_folder / path.name)
        deps.append({"file": path.name, "name": name_of(path.name.split("-")[0]), "bytes": path.stat().st_size,
                     "sha256": sha256(path)})
    manifest = {"requirement": requirement, "python": PYTHON_VERSION, "platforms": list(PLATFORMS),
                "wheel": {"file": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256(wheel)},
                "parts": parts, "dependencies": deps}
    for index in range(1, count + 1):
        (staging / f"part-{index}" / MANIFEST).write_text(json.dumps({**manifest, "part": index}, indent=1) + "\n")
    # the pieces joined give the wheel back, byte for byte
    joined = hashlib.sha256()
    for index in range(1, count + 1):
        joined.update((staging / f"part-{index}" / PART_FILE).read_bytes())
    if joined.hexdigest() != manifest["wheel"]["sha256"]:
        raise TransferError("the parts joined do not give the wheel back")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TransferError(f"no readable {MANIFEST} in {folder} ({exc.__class__.__name__}): "
                            f"run python -m tools.gpu_plan.dali_transfer prepare first") from None


def room(root: Path = ROOT) -> int:
    return CARRY_LIMIT - checkout_bytes(root) - MARGIN


def prepare(args) -> int:
    out = Path(args.dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    space = min(PART_LIMIT, room())
    with tempfile.TemporaryDirectory(prefix="dali-download-", dir=out.parent) as tmp:
        download = Path(tmp)
        pip_download([args.requirement], download)
        [wheel] = download.glob("*.whl")
        wanted = requirements(wheel)
        (download / "deps").mkdir()
        if wanted:
            pip_download(wanted, download / "deps")
        dependencies = sorted((download / "deps").glob("*.whl"))
        deps_size = sum(path.stat().st_size for path in dependencies)
        size = part_bytes(wheel.stat().st_size, deps_size, space)
        manifest = split(wheel, dependencies, out, size, args.requirement)
    say(f"{manifest['wheel']['file']}: {mib(manifest['wheel']['bytes'])}, sha256 {manifest['wheel']['sha256']}")
    say(f"dependencies ({mib(deps_size)}): {', '.join(d['file'] for d in manifest['dependencies'])}")
    say(f"{len(manifest['parts'])} parts of at most {mib(size)} in {out} (room per command: {mib(space)})")
    print(device_commands(out, manifest))
    return 0


def device_commands(out: Path, manifest: dict) -> str:
    """The device commands, in order, with what each carries and its time limit."""
    folder = out.relative_to(ROOT) if out.is_absolute() and out.is_relative_to(ROOT) else out
    count = len(manifest["parts"])
    lines = ["Device commands, each started at once after the one before (the machine keeps /tmp only "
             "while it is warm):"]
    for index in range(1, count + 1):
        part = f"{folder}/part-{index}"
        command = f"python3 -m tools.gpu_plan.dali_transfer receive {part}"
        timeout = PART_TIMEOUT
        if index == count:
            command += (f" && python3 -m tools.gpu_plan.dali_transfer install && PYTHONPATH={LANDING / 'site'} "
                        f"python3 -m tools.gpu_plan dali --budget-seconds {STAGE_BUDGET}")
            timeout = 600
        lines += [f"{index}. carry [\"{part}\"], timeout_s {timeout}:", f"   {command}"]
    return "\n".join(lines)


def commands(args) -> int:
    out = Path(args.dir)
    manifest = read_manifest(out / "part-1")
    space = room()
    for index in range(1, len(manifest["parts"]) + 1):
        folder = out / f"part-{index}"
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        if size > space:
            raise TransferError(f"{folder} ({mib(size)}) no longer fits one command beside the checkout "
                                f"({mib(checkout_bytes())}; room {mib(space)}): run prepare again")
    print(device_commands(out, manifest))
    return 0


def receive(args) -> int:
    part_dir = Path(args.part)
    manifest = read_manifest(part_dir)
    index, landing = manifest["part"], Path(args.landing)
    expected = manifest["parts"][index - 1]
    landing.mkdir(parents=True, exist_ok=True)
    if (landing / MANIFEST).is_file():
        known = json.loads((landing / MANIFEST).read_text())
        if known["wheel"]["sha256"] != manifest["wheel"]["sha256"]:  # parts of another wheel: not to be joined
            say(f"{landing} held parts of {known['wheel']['file']}: removed")
            shutil.rmtree(landing)
            landing.mkdir(parents=True)
    write_json(landing / MANIFEST, {k: v for k, v in manifest.items() if k != "part"})
    target = landing / f"part-{index}"
    if target.is_file() and target.stat().st_size == expected["bytes"] and sha256(target) == expected["sha256"]:
        say(f"part {index} was already here")
    else:
        if sha256(part_dir / PART_FILE) != expected["sha256"]:
            raise TransferError(f"{part_dir / PART_FILE} is damaged (sha256 differs from its manifest): prepare again")
        keep(part_dir / PART_FILE, target)
    for dep in manifest["dependencies"] if (part_dir / "deps").is_dir() else []:
        source = part_dir / "deps" / dep["file"]
        if sha256(source) != dep["sha256"]:
            raise TransferError(f"{source} is damaged (sha256 differs from its manifest): prepare again")
        keep(source, landing / "deps" / dep["file"])
    here = [p["index"] for p in manifest["parts"] if (landing / f"part-{p['index']}").is_file()]
    missing = [p["index"] for p in manifest["parts"] if p["index"] not in here]
    say(f"part {index} of {len(manifest['parts'])} kept in {landing}; here: {', '.join(map(str, here))}"
        + (f"; still to come: {', '.join(map(str, missing))}" if missing else "; all here: install next"))
    return 0


def keep(source: Path, target: Path) -> None:
    """Copy source to target through a temporary name: a command killed mid-copy leaves no part."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def install(args) -> int:
    landing = Path(args.landing)
    site = Path(args.target) if args.target else landing / "site"
    if not (landing / MANIFEST).is_file():
        raise TransferError(f"no part has arrived in {landing}: run the part commands first (tools/gpu_plan/README.md)")
    manifest = read_manifest(landing)
    wheel = manifest["wheel"]
    stamp = landing / "installed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"sha256": wheel["sha256"], "site": str(site)} \
            and check_import(site):
        say(f"{wheel['file']} is installed in {site} already")
        return 0
    count = len(manifest["parts"])
    missing = [p["index"] for p in manifest["parts"] if not (landing / f"part-{p['index']}").is_file()]
    if missing:
        raise TransferError(f"part(s) {', '.join(map(str, missing))} of {count} are not in {landing} (a machine that "
                            f"went cold lost them with /tmp): run their commands again")
    joined = landing / wheel["file"]

    def join(tmp: Path) -> None:  # the joined wheel appears under its name only once its sha256 is the manifest's
        digest = hashlib.sha256()
        with open(tmp, "wb") as sink:
            for part in manifest["parts"]:
                data = (landing / f"part-{part['index']}").read_bytes()
                digest.update(data)
                sink.write(data)
        if digest.hexdigest() != wheel["sha256"]:
            bad = [p["index"] for p in manifest["parts"] if sha256(landing / f"part-{p['index']}") != p["sha256"]]
            for index in bad:
                (landing / f"part-{index}").unlink()
            raise TransferError(f"the joined wheel's sha256 is not {wheel['sha256']}: part(s) "
                                f"{', '.join(map(str, bad))} damaged and removed: run their commands again")

    atomic_write(joined, join)
    say(f"{wheel['file']}: {count} parts joined, sha256 {wheel['sha256']} as in the manifest")
    dependencies = [d for d in manifest["dependencies"] if not installed(d["name"])]
    say(f"dependencies this python lacks: {', '.join(d['name'] for d in dependencies) or 'none'}")
    fresh = site.with_name(site.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--target", str(fresh), str(joined),
               *(str(landing / "deps" / d["file"]) for d in dependencies)]
    result = subprocess.run(command, capture_output=True, text=True)
    joined.unlink()  # the parts stay: installing again needs no part sent again
    if result.returncode != 0:
        raise TransferError(f"pip install failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    # DALI's wheel leaves nvidia/ a namespace folder; where the machine's own nvidia/ (CUDA libraries)
    # is a regular package, that one would hide this folder's nvidia.dali. A pkgutil-style package
    # here comes first on PYTHONPATH and extends its path over every other nvidia/, so both are seen.
    (fresh / "nvidia" / "__init__.py").write_text(NVIDIA_INIT)
    shutil.rmtree(site, ignore_errors=True)
    fresh.rename(site)
    version = check_import(site)
    if not version:
        raise TransferError(f"installed in {site}, but `import nvidia.dali` fails there: {import_error(site)}")
    write_text(stamp, json.dumps({"sha256": wheel["sha256"], "site": str(site)}) + "\n")
    say(f"NVIDIA DALI {version} installed in {site}: run with PYTHONPATH={site}")
    return 0


def import_check(site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = "import nvidia.dali, sys; sys.stdout.write(nvidia.dali.__version__ + '\\n' + nvidia.dali.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())


def check_import(site: Path) -> str | None:
    """The version of the DALI imported with site on PYTHONPATH, or None unless it is site's own."""
    result = import_check(site)
    if result.returncode != 0:
        return None
    version, file = result.stdout.splitlines()
    return version if Path(file).resolve().is_relative_to(site.resolve()) else None


def import_error(site: Path) -> str:
    result = import_check(site)
    if result.returncode == 0:
        return f"it imports {result.stdout.splitlines()[-1]} instead"
    return (result.stderr.strip().splitlines() or ["?"])[-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="download the wheel and its dependencies, split it into parts")
    pr.add_argument("--dir", default=str(PARTS), help="where the part folders go (default data/dali-wheel)")
    pr.add_argument("--requirement", default=REQUIREMENT, help=f"the DALI wheel (default {REQUIREMENT})")
    co = sub.add_parser("commands", help="the device commands for the prepared parts")
    co.add_argument("--dir", default=str(PARTS))
    rc = sub.add_parser("receive", help="on the GPU machine: keep one part under the landing folder")
    rc.add_argument("part", help="a part folder, e.g. data/dali-wheel/part-1")
    rc.add_argument("--landing", default=str(LANDING))
    ins = sub.add_parser("install", help="on the GPU machine: join the parts, check the sha256, install")
    ins.add_argument("--landing", default=str(LANDING))
    ins.add_argument("--target", help="the folder for PYTHONPATH (default LANDING/site)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prepare": prepare, "commands": commands, "receive": receive, "install": install}[args.command](args)
    except TransferError as exc:
        print(f"dali_transfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
