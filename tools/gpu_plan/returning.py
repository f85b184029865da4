"""What a GPU-plan command brings back: its results in this repository's layout, bundled for the trip.

A command on the GPU machine returns only the files it leaves in $OUT, and at most 8 of them, of at
most 16 MiB each and 64 MiB together, none more than two folders down. So the stages write their
results into a return tree under the work folder, laid out as this repository (bench/results/...,
preresnet/weights/...), and publish() bundles that tree into $OUT after every save: one tar split
into parts of 15 MiB (PART_BYTES) and a manifest with each part's size and sha256, all at the top
of $OUT, replacing the previous bundle part by part (a command killed between two saves returns the
last whole bundle; a part left over from a longer bundle is removed). Here, after the command:

    python -m tools.gpu_plan unpack FILES_AT    # checks the parts, extracts the tree over the checkout

Every file of the bundle is written atomically (preresnet.runfiles: a temporary `.NAME.PID.tmp`
beside it, renamed over it), so $OUT never holds half a part.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import threading
from pathlib import Path

from preresnet.runfiles import atomic_write, write_json

MAX_FILES, MAX_FILE_BYTES, MAX_BYTES = 8, 16 * 2**20, 64 * 2**20  # what a command may return
PART_BYTES = 15 * 2**20
MANIFEST = "returned.json"
PART_PREFIX = "returned.tar."
LEFT_OUT_FIRST = (".log",)  # when the tree is over the limit, logs are left out before anything else

_lock = threading.Lock()  # the checkpoint watcher and the stage publish from two threads
_active: tuple[Path, Path] | None = None  # (return tree, $OUT) of this command, once activate() ran


def activate(tree: Path, out: Path) -> None:
    """This command runs on a device machine: publish() bundles tree into out from now on."""
    global _active
    tree.mkdir(parents=True, exist_ok=True)
    _active = (tree, out)


def tree() -> Path | None:
    """The return tree of this command (None where nothing is returned: on this machine)."""
    return _active[0] if _active else None


def bundle_bytes(tree: Path, leave_out: tuple[str, ...] = ()) -> tuple[bytes, list[str]]:
    """The tree as one tar (files in sorted order), without the files whose names end in leave_out."""
    buffer, names = io.BytesIO(), []
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            name = path.relative_to(tree).as_posix()
            if name.endswith(leave_out) or "/." in f"/{name}":  # temporary files of a write in progress
                continue
            tar.add(path, arcname=name)
            names.append(name)
    return buffer.getvalue(), names


def publish() -> dict | None:
    """Bundle the active return tree into $OUT (see the module docstring); the manifest, or None
    where this command returns nothing or the tree does not fit even without its logs."""
    if _active is None:
        return None
    tree, out = _active
    with _lock:
        data, names = bundle_bytes(tree)
        left_out: list[str] = []
        if len(data) > MAX_BYTES - 2**20:
            everything = set(names)
            data, names = bundle_bytes(tree, LEFT_OUT_FIRST)
            left_out = sorted(everything - set(names))
        if len(data) > MAX_BYTES - 2**20 or -(-len(data) // PART_BYTES) > MAX_FILES - 1:
            # the stage goes on: the last bundle that fitted stays in $OUT, and this says why it is old
            print(f"[returning] the results ({len(data) / 2**20:.1f} MiB) do not fit the {MAX_BYTES / 2**20:.0f} MiB "
                  f"a command brings back: $OUT keeps the last bundle that did", file=sys.stderr, flush=True)
            return None
        parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
        manifest = {"parts": [], "files": names, "left_out": left_out, "bytes": len(data)}
        for index, part in enumerate(parts):
            name = f"{PART_PREFIX}{index:03d}"
            atomic_write(out / name, lambda tmp, part=part: tmp.write_bytes(part))
            manifest["parts"].append({"name": name, "bytes": len(part), "sha256": hashlib.sha256(part).hexdigest()})
        write_json(out / MANIFEST, manifest)
        for stale in out.glob(f"{PART_PREFIX}*"):
            if stale.name not in {part["name"] for part in manifest["parts"]}:
                stale.unlink()
        # the temporary files of a command killed mid-write (each would come back as a file of its own)
        for stale in [*out.glob(f".{PART_PREFIX}*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]:
            stale.unlink(missing_ok=True)
        return manifest


def unpack(source: Path, into: Path) -> list[str]:
    """Check the bundle in source (the returned files) and extract it over into; the files written."""
    manifest_path = Path(source) / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path} is missing: {source} holds no returned results")
    manifest = json.loads(manifest_path.read_text())
    data = bytearray()
    for part in manifest["parts"]:
        payload = (Path(source) / part["name"]).read_bytes()
        if len(payload) != part["bytes"] or hashlib.sha256(payload).hexdigest() != part["sha256"]:
            raise ValueError(f"{part['name']} is damaged or from another bundle (size or sha256 differs from "
                             f"{MANIFEST})")
        data += payload
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    return names
