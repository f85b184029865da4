"""tools/gpu_plan/returning.py: a GPU-plan command's results, bundled into the few top-level files a command
brings back (at most 8, 16 MiB each, 64 MiB together), and unpacked over a checkout here."""

import hashlib
import json
import os

import pytest

from tools.gpu_plan import returning


@pytest.fixture
def active(tmp_path, monkeypatch):
    tree, out = tmp_path / "return", tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(returning, "_active", None)
    returning.activate(tree, out)
    return tree, out


def fill(tree, files: dict) -> None:
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)


def assert_returnable(out) -> None:
    files = list(out.iterdir())
    assert all(path.is_file() for path in files), "nothing but files at the top of $OUT"
    assert len(files) <= returning.MAX_FILES
    assert all(path.stat().st_size <= returning.MAX_FILE_BYTES for path in files)
    assert sum(path.stat().st_size for path in files) <= returning.MAX_BYTES


def test_a_tree_travels_in_parts_and_unpacks_as_it_was(active, tmp_path):
    tree, out = active
    files = {"bench/results/reproduce/net/seed-0/checkpoint.pt": os.urandom(20 * 2**20),  # more than one part
             "bench/results/reproduce/net/seed-0/metrics.jsonl": b'{"epoch": 1}\n',
             "bench/results/reproduce/net/run.json": b"{}\n",
             "preresnet/weights/entry.json": b"{}\n"}
    fill(tree, files)
    (tree / "bench/results/reproduce/net/seed-0/.checkpoint.pt.copy").write_bytes(b"half a copy")
    manifest = returning.publish()
    assert len(manifest["parts"]) == 2 and sorted(manifest["files"]) == sorted(files)
    assert_returnable(out)
    checkout = tmp_path / "checkout"
    written = returning.unpack(out, checkout)
    assert sorted(written) == sorted(files)
    for name, data in files.items():
        assert (checkout / name).read_bytes() == data, name

    # a smaller tree replaces the bundle: no part of the longer one is left
    (tree / "bench/results/reproduce/net/seed-0/checkpoint.pt").unlink()
    assert len(returning.publish()["parts"]) == 1
    assert sorted(path.name for path in out.iterdir()) == [returning.MANIFEST, f"{returning.PART_PREFIX}000"]


def test_a_damaged_part_is_refused(active, tmp_path):
    tree, out = active
    fill(tree, {"bench/results/x/report.json": b"{}" * 1000})
    returning.publish()
    part = out / f"{returning.PART_PREFIX}000"
    data = bytearray(part.read_bytes())
    data[10] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="000 is damaged"):
        returning.unpack(out, tmp_path / "checkout")
    assert not (tmp_path / "checkout").exists()


def test_over_the_limit_logs_are_left_out_first_then_the_last_bundle_stays(active, monkeypatch, capsys):
    tree, out = active
    monkeypatch.setattr(returning, "MAX_BYTES", 4 * 2**20)
    monkeypatch.setattr(returning, "PART_BYTES", 2**20)
    fill(tree, {"bench/results/r/checkpoint.pt": os.urandom(2 * 2**20), "bench/results/r/train.log": os.urandom(2**20)})
    manifest = returning.publish()
    assert manifest["left_out"] == ["bench/results/r/train.log"] and manifest["files"] == ["bench/results/r/checkpoint.pt"]
    fill(tree, {"bench/results/r/other.pt": os.urandom(2 * 2**20)})
    assert returning.publish() is None
    assert "do not fit the 4 MiB a command brings back" in capsys.readouterr().err
    # the last bundle that fitted is still whole
    listed = json.loads((out / returning.MANIFEST).read_text())["parts"]
    assert all(hashlib.sha256((out / part["name"]).read_bytes()).hexdigest() == part["sha256"] for part in listed)


def test_nothing_is_published_on_this_machine(monkeypatch):
    monkeypatch.setattr(returning, "_active", None)
    assert returning.publish() is None and returning.tree() is None
