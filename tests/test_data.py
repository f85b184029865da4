"""Tests for preresnet.data: CIFAR archives, image folders and channel statistics.

Everything runs on the CPU on small data the tests build themselves under tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preresnet import data
from preresnet.errors import UserError

# --- helpers ---------------------------------------------------------------------------------------


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def encode_cifar(images: np.ndarray) -> np.ndarray:
    """HWC uint8 images -> N x 3072 rows of 3 channel planes, each 32x32 row-major (official layout)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_tar_gz(archive: Path, src_root: Path, folder: str) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_root / folder, arcname=folder)


@dataclasses.dataclass
class FakeCifar:
    archive: Path  # outside any data dir
    md5: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def build_cifar10(tmp_path: Path, per_batch: int = 4) -> FakeCifar:
    rng = np.random.default_rng(10)
    spec = data.CIFAR_SPECS["cifar10"]
    src = tmp_path / "build10"
    folder = src / spec.folder
    folder.mkdir(parents=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    n_train = per_batch * len(spec.train_files)
    train_images = random_images(rng, n_train)
    train_labels = rng.permutation(np.arange(n_train) % 10)  # every class present, so names are kept
    for i, name in enumerate(spec.train_files):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        write_pickle(folder / name, {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": [int(v) for v in train_labels[sl]],
            b"data": encode_cifar(train_images[sl]),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        })
    test_images = random_images(rng, per_batch)
    test_labels = rng.integers(0, 10, size=per_batch)
    write_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in test_labels],
        b"data": encode_cifar(test_images),
    })
    write_pickle(folder / "batches.meta", {
        b"label_names": [c.encode() for c in classes],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    })
    archive = tmp_path / "server" / spec.archive
    make_tar_gz(archive, src, spec.folder)
    return FakeCifar(archive, md5_of(archive), train_images, train_labels, test_images, test_labels, classes)


def build_cifar100(tmp_path: Path) -> FakeCifar:
    rng = np.random.default_rng(100)
    spec = data.CIFAR_SPECS["cifar100"]
    src = tmp_path / "build100"
    folder = src / spec.folder
    folder.mkdir(parents=True)
    classes = [f"class_{i:02d}" for i in range(100)]
    train_images = random_images(rng, 6)
    train_labels = np.array([99, 0, 42, 7, 42, 13])
    test_images = random_images(rng, 3)
    test_labels = np.array([5, 99, 1])
    write_pickle(folder / "train", {
        b"fine_labels": [int(v) for v in train_labels],
        b"coarse_labels": [int(v) // 5 for v in train_labels],
        b"data": encode_cifar(train_images),
    })
    write_pickle(folder / "test", {
        b"fine_labels": [int(v) for v in test_labels],
        b"coarse_labels": [int(v) // 5 for v in test_labels],
        b"data": encode_cifar(test_images),
    })
    write_pickle(folder / "meta", {
        b"fine_label_names": [c.encode() for c in classes],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    })
    archive = tmp_path / "server" / spec.archive
    make_tar_gz(archive, src, spec.folder)
    return FakeCifar(archive, md5_of(archive), train_images, train_labels, test_images, test_labels, classes)


def patch_spec(monkeypatch, name: str, **changes) -> data.CifarSpec:
    spec = dataclasses.replace(data.CIFAR_SPECS[name], **changes)
    monkeypatch.setitem(data.CIFAR_SPECS, name, spec)
    return spec


def assert_dataset_matches(ds: data.Dataset, fake: FakeCifar, name: str) -> None:
    assert ds.name == name
    for split, images, labels in ((ds.train, fake.train_images, fake.train_labels),
                                  (ds.test, fake.test_images, fake.test_labels)):
        assert split.images.dtype == np.uint8
        assert split.images.shape == images.shape
        assert split.images.flags.c_contiguous
        np.testing.assert_array_equal(split.images, images)  # pixel-exact, CHW planes -> HWC
        assert split.labels.dtype == np.int64
        np.testing.assert_array_equal(split.labels, labels)
    assert ds.classes == fake.classes
    assert ds.num_classes == len(fake.classes)


# --- CIFAR ----------------------------------------------------------------------------------------

OFFICIAL_CIFAR10_MD5 = data.CIFAR_SPECS["cifar10"].md5


@pytest.fixture
def cifar10(tmp_path, monkeypatch) -> FakeCifar:
    fake = build_cifar10(tmp_path)
    patch_spec(monkeypatch, "cifar10", md5=fake.md5, url=fake.archive.as_uri())
    return fake


def test_cifar10_download_verify_extract(tmp_path, cifar10):
    data_dir = tmp_path / "data" / "nested"  # does not exist yet: created by the loader
    ds = data.load_dataset("cifar10", data_dir)
    assert_dataset_matches(ds, cifar10, "cifar10")
    archive = data_dir / cifar10.archive.name
    assert archive.is_file() and md5_of(archive) == cifar10.md5
    assert (data_dir / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not list(data_dir.glob("*.part"))


def test_cifar10_hwc_layout_of_a_known_image(tmp_path, cifar10):
    """A pixel-level check independent of encode_cifar: the first bytes of a row are the red plane."""
    ds = data.load_cifar("cifar10", tmp_path / "data")
    with tarfile.open(cifar10.archive) as tar:
        raw = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"), encoding="bytes")[b"data"][0]
    img = ds.train.images[0]
    assert img[0, 0, 0] == raw[0] and img[0, 1, 0] == raw[1] and img[1, 0, 0] == raw[32]
    assert img[0, 0, 1] == raw[1024] and img[0, 0, 2] == raw[2048] and img[31, 31, 2] == raw[3071]


def test_cifar10_second_load_uses_extracted_batches(tmp_path, cifar10, monkeypatch):
    data_dir = tmp_path / "data"
    first = data.load_dataset("cifar10", data_dir)
    (data_dir / cifar10.archive.name).unlink()
    cifar10.archive.unlink()  # neither a local archive nor a reachable URL is left

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the batches are extracted")

    monkeypatch.setattr(data, "download", no_download)
    second = data.load_dataset("cifar10", data_dir, download_missing=False)
    assert_dataset_matches(second, cifar10, "cifar10")
    np.testing.assert_array_equal(first.train.images, second.train.images)


def test_cifar10_present_archive_is_used_without_download(tmp_path, cifar10, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / cifar10.archive.name).write_bytes(cifar10.archive.read_bytes())
    patch_spec(monkeypatch, "cifar10", md5=cifar10.md5, url="file:///nonexistent/cifar-10-python.tar.gz")
    ds = data.load_dataset("cifar10", data_dir)
    assert_dataset_matches(ds, cifar10, "cifar10")


@pytest.mark.parametrize("how", ["official-md5", "corrupt-byte"])
def test_cifar10_archive_with_wrong_md5(tmp_path, cifar10, monkeypatch, how):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / cifar10.archive.name
    content = bytearray(cifar10.archive.read_bytes())
    if how == "official-md5":
        patch_spec(monkeypatch, "cifar10", md5=OFFICIAL_CIFAR10_MD5)  # our archive is not the official one
    else:
        content[len(content) // 2] ^= 0xFF
    archive.write_bytes(bytes(content))
    with pytest.raises(UserError) as info:
        data.load_dataset("cifar10", data_dir)
    message = str(info.value)
    assert str(archive) in message
    assert "MD5" in message
    assert not (data_dir / "cifar-10-batches-py").exists()  # nothing extracted from a bad archive


def test_cifar10_unreachable_url(tmp_path, monkeypatch):
    url = "file:///nonexistent/x.tar.gz"
    patch_spec(monkeypatch, "cifar10", url=url)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as info:
        data.load_dataset("cifar10", data_dir)
    assert url in str(info.value)
    assert not list(data_dir.glob("*"))  # no archive, no leftover .part file


def test_cifar10_missing_archive_without_download(tmp_path, cifar10):
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as info:
        data.load_dataset("cifar10", data_dir, download_missing=False)
    assert str(data_dir / cifar10.archive.name) in str(info.value)


def test_cifar10_corrupt_extracted_batch(tmp_path, cifar10):
    data_dir = tmp_path / "data"
    data.load_dataset("cifar10", data_dir)
    batch = data_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(UserError) as info:
        data.load_dataset("cifar10", data_dir)
    assert str(batch) in str(info.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_load_split_reads_only_that_split(tmp_path, cifar10, monkeypatch, split):
    data_dir = tmp_path / "data"
    full = data.load_dataset("cifar10", data_dir)
    read = []
    original = data.unpickle

    def recording(path):
        read.append(path.name)
        return original(path)

    monkeypatch.setattr(data, "unpickle", recording)
    images, classes = data.load_split("cifar10", data_dir, split)
    spec = data.CIFAR_SPECS["cifar10"]
    assert read == [*(spec.train_files if split == "train" else spec.test_files), spec.meta_file]
    assert_split(images, getattr(full, split).images, getattr(full, split).labels)
    assert classes == cifar10.classes


def test_cifar100_format(tmp_path, monkeypatch):
    fake = build_cifar100(tmp_path)
    patch_spec(monkeypatch, "cifar100", md5=fake.md5, url=fake.archive.as_uri())
    data_dir = tmp_path / "data"
    ds = data.load_dataset("cifar100", data_dir)
    assert_dataset_matches(ds, fake, "cifar100")
    assert (data_dir / "cifar-100-python" / "meta").is_file()
    assert ds.classes[99] == "class_99"


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="svhn"):
        data.load_dataset("svhn", tmp_path)


# --- image folders --------------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, format="PNG")


def make_folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0):
    """Write root/<split>/<class>/NNN.png; return {split: (images, labels)} in the expected order."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, counts in layout.items():
        classes = sorted(counts)
        images, labels = [], []
        for label, cls in enumerate(classes):
            for j in range(counts[cls]):
                img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                write_png(root / split / cls / f"{j:03d}.png", img)
                images.append(img)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, dtype=np.int64))
    return expected


LAYOUT = {"train": {"zebra": 2, "ant": 3, "moose": 1}, "test": {"zebra": 1, "ant": 1, "moose": 2}}


def assert_split(split: data.Split, images: np.ndarray, labels: np.ndarray) -> None:
    assert split.images.dtype == np.uint8 and split.images.shape == images.shape
    np.testing.assert_array_equal(split.images, images)
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, labels)


def test_folder_reads_pixels_classes_and_labels(tmp_path):
    root = tmp_path / "ds"
    expected = make_folder(root, LAYOUT)
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    (root / "train" / ".hidden").mkdir()  # hidden folders are not classes
    (root / "train" / "README.txt").write_text("not a class")  # files beside the classes are ignored
    ds = data.load_dataset("folder", root)
    assert ds.name == "folder"
    assert ds.classes == ["ant", "moose", "zebra"]
    assert ds.num_classes == 3
    assert_split(ds.train, *expected["train"])
    assert_split(ds.test, *expected["test"])
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 2, 2])


def test_folder_cache_is_written_and_reused(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    expected = make_folder(root, LAYOUT)
    data.load_folder(root)
    assert (root / ".preresnet-cache-train.npz").is_file()
    assert (root / ".preresnet-cache-test.npz").is_file()
    assert not list(root.glob("*.tmp.npz"))

    def no_decode(files):
        raise AssertionError("decode_images called although the cache is valid")

    monkeypatch.setattr(data, "decode_images", no_decode)
    ds = data.load_folder(root)
    assert_split(ds.train, *expected["train"])
    assert_split(ds.test, *expected["test"])


def test_folder_cache_rebuilt_when_an_image_is_added(tmp_path):
    root = tmp_path / "ds"
    expected = make_folder(root, LAYOUT)
    assert len(data.load_folder(root).train.images) == 6
    extra = np.full((32, 32, 3), 7, dtype=np.uint8)
    write_png(root / "train" / "moose" / "999.png", extra)
    ds = data.load_folder(root)
    assert len(ds.train.images) == 7
    np.testing.assert_array_equal(ds.train.images[4], extra)  # after moose/000.png, before the zebras
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 2, 2])
    assert_split(ds.test, *expected["test"])


def test_folder_cache_rebuilt_when_an_image_changes(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    data.load_folder(root)
    changed = np.full((32, 32, 3), 200, dtype=np.uint8)
    path = root / "test" / "zebra" / "000.png"
    write_png(path, changed)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a surely different mtime
    ds = data.load_folder(root)
    np.testing.assert_array_equal(ds.test.images[-1], changed)


def test_folder_cache_rebuilt_when_an_image_changes_but_not_its_size(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    path = root / "train" / "ant" / "001.png"
    write_png(path, np.full((32, 32, 3), 100, dtype=np.uint8))
    size = path.stat().st_size
    ds = data.load_folder(root)
    assert (ds.train.images[1] == 100).all()
    write_png(path, np.full((32, 32, 3), 200, dtype=np.uint8))
    assert path.stat().st_size == size  # only the modification time tells the change
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ds = data.load_folder(root)
    assert (ds.train.images[1] == 200).all()


def test_folder_unreadable_cache_is_rebuilt(tmp_path):
    root = tmp_path / "ds"
    expected = make_folder(root, LAYOUT)
    data.load_folder(root)
    (root / ".preresnet-cache-train.npz").write_bytes(b"not an npz file")
    ds = data.load_folder(root)
    assert_split(ds.train, *expected["train"])
    with np.load(root / ".preresnet-cache-train.npz") as cached:  # rewritten, valid again
        np.testing.assert_array_equal(cached["images"], expected["train"][0])


def test_folder_test_split_alone_reads_no_training_image(tmp_path, monkeypatch):
    """eval.py reads only the test split: a folder without train/ is enough, and no train cache is made."""
    root = tmp_path / "ds"
    expected = make_folder(root, {"test": LAYOUT["test"]})
    split, classes = data.load_split("folder", root, "test")
    assert classes == ["ant", "moose", "zebra"]
    assert_split(split, *expected["test"])
    assert [p.name for p in root.glob(".preresnet-cache-*")] == [".preresnet-cache-test.npz"]
    # beside a train/ folder too: its images are neither listed nor decoded, and its cache not written
    make_folder(root, {"train": LAYOUT["train"]}, seed=1)
    listed = []
    original = data.list_class_files
    monkeypatch.setattr(data, "list_class_files",
                        lambda split_dir: listed.append(split_dir.name) or original(split_dir))
    split, _ = data.load_split("folder", root, "test")
    assert listed == ["test"] and not (root / ".preresnet-cache-train.npz").exists()
    assert_split(split, *expected["test"])
    with pytest.raises(UserError, match="unknown split 'val': choose train or test"):
        data.load_split("folder", root, "val")


def test_folder_missing(tmp_path):
    root = tmp_path / "nope"
    with pytest.raises(UserError) as info:
        data.load_dataset("folder", root)
    assert str(root) in str(info.value)


def test_folder_missing_test_split(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, {"train": LAYOUT["train"]})
    with pytest.raises(UserError) as info:
        data.load_folder(root)
    assert str(root / "test") in str(info.value)


def test_folder_split_without_classes(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, {"train": LAYOUT["train"]})
    (root / "test").mkdir()
    with pytest.raises(UserError) as info:
        data.load_folder(root)
    assert str(root / "test") in str(info.value)


@pytest.mark.parametrize("case", ["not-an-image", "truncated"])
def test_folder_bad_image(tmp_path, case):
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    bad = root / "train" / "moose" / "bad.png"
    if case == "not-an-image":  # an image's name, not an image's bytes
        bad.write_text("hello, I am not an image\n")
    else:
        write_png(bad, np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError) as info:
        data.load_folder(root)
    assert str(bad) in str(info.value)


def pil_resized(array: np.ndarray) -> np.ndarray:
    """torchvision's Resize(32) then CenterCrop(32) of a PIL image, written out with PIL: the shorter
    side to 32 (the longer to int(32 * long / short)) with PIL's antialiased bilinear filter, then
    the centre crop at int(round((size - 32) / 2)) (torchvision.transforms.functional.center_crop)."""
    height, width = array.shape[:2]
    if height <= width:
        size = (int(32 * width / height), 32)
    else:
        size = (32, int(32 * height / width))
    resized = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))
    top, left = int(round((resized.shape[0] - 32) / 2.0)), int(round((resized.shape[1] - 32) / 2.0))
    return resized[top:top + 32, left:left + 32]


def test_folder_reads_what_image_folder_reads(tmp_path, capsys):
    """As torchvision's ImageFolder: a file without an image extension is skipped (with a note),
    any image is converted to RGB (grayscale replicated, alpha dropped), and an image of another size
    is resized and centre-cropped to 32x32 as transforms() do (within one level of PIL's rounding)."""
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    large = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    folder = root / "train" / "moose"
    write_png(folder / "001-gray.png", gray, "L")
    write_png(folder / "002-rgba.png", rgba, "RGBA")
    write_png(folder / "003-large.png", large)
    Image.fromarray(wide).save(folder / "004-WIDE.PNG")  # the extension in capitals: an image all the same
    (folder / "notes.txt").write_text("where these came from\n")
    capsys.readouterr()
    ds = data.load_folder(root)
    err = capsys.readouterr().err
    assert f"note: skipped 1 file of {root / 'train'} without an image extension (moose/notes.txt)" in err
    assert f"note: 4 of 10 images in {root / 'train'} were not 32x32 RGB" in err
    moose = ds.train.images[ds.train.labels == 1]
    assert len(moose) == 5 and ds.train.images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(moose[1], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(moose[2], rgba[..., :3])
    for decoded, original in ((moose[3], large), (moose[4], wide)):
        assert np.abs(decoded.astype(int) - pil_resized(original).astype(int)).max() <= 1


def test_folder_class_of_only_other_files_is_one_line(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    for path in (root / "test" / "ant").iterdir():
        path.unlink()
    (root / "test" / "ant" / "labels.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"class folder .*/test/ant holds no images \(files named \*.jpg, \*.jpeg"):
        data.load_folder(root)


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong shape"])
def test_folder_damaged_cache_is_rebuilt(tmp_path, damage):
    """A decode cache cut short (a full disk, a killed copy) is rebuilt, not a traceback
    (zipfile.BadZipFile before), as is one whose arrays do not fit its files."""
    root = tmp_path / "ds"
    expected = make_folder(root, LAYOUT)
    data.load_folder(root)
    cache = root / ".preresnet-cache-train.npz"
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    else:
        with np.load(cache) as cached:
            fingerprint = cached["fingerprint"]
        np.savez(cache, images=expected["train"][0][:2], labels=expected["train"][1][:2], fingerprint=fingerprint)
    ds = data.load_folder(root)
    assert_split(ds.train, *expected["train"])
    with np.load(cache) as cached:  # rewritten, valid again
        np.testing.assert_array_equal(cached["images"], expected["train"][0])


def test_data_sha256_is_the_data_wherever_it_lies(tmp_path):
    """The same images under the same class names hash alike in any folder; a changed pixel, a
    renamed class or a label moved to another class does not."""
    make_folder(tmp_path / "a", LAYOUT)
    make_folder(tmp_path / "b", LAYOUT)
    first, moved = data.load_folder(tmp_path / "a"), data.load_folder(tmp_path / "b")
    assert data.data_sha256(first) == data.data_sha256(moved)
    changed = dataclasses.replace(first, train=data.Split(first.train.images.copy(), first.train.labels))
    changed.train.images[0, 0, 0, 0] ^= 1
    relabelled = dataclasses.replace(first, test=data.Split(first.test.images, first.test.labels[::-1].copy()))
    renamed = dataclasses.replace(first, classes=["ant", "elk", "zebra"])
    hashes = {data.data_sha256(ds) for ds in (first, changed, relabelled, renamed)}
    assert len(hashes) == 4


def test_folder_different_class_sets(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, {"train": {"ant": 1, "bee": 1}, "test": {"ant": 1, "wasp": 1}})
    with pytest.raises(UserError) as info:
        data.load_folder(root)
    message = str(info.value)
    assert str(root / "train") in message and str(root / "test") in message
    assert "bee" in message and "wasp" in message


def test_folder_empty_class_folder(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, LAYOUT)
    empty = root / "test" / "ant"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(UserError) as info:
        data.load_folder(root)
    assert str(empty) in str(info.value)


# --- channel statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 32, 32, 3), (5000, 2, 2, 3)])  # the second spans several 4096 chunks
def test_channel_mean_std_matches_numpy(shape):
    rng = np.random.default_rng(3)
    images = np.stack([rng.integers(lo, hi, size=shape[:-1]) for lo, hi in ((0, 256), (50, 120), (200, 256))],
                      axis=-1).astype(np.uint8)
    mean, std = data.channel_mean_std(images)
    flat = images.reshape(-1, 3).astype(np.float64) / 255.0
    assert isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-7, atol=1e-9)


def test_channel_std_has_a_floor_for_constant_images():
    images = np.full((4, 32, 32, 3), 100, dtype=np.uint8)
    mean, std = data.channel_mean_std(images)
    np.testing.assert_allclose(mean, [100 / 255] * 3)
    assert all(s == pytest.approx(1e-3) for s in std)
