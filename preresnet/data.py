"""CIFAR-10/100 and image-folder datasets, read whole into N x 32 x 32 x 3 uint8 arrays (150 MB for
CIFAR); `preresnet.loaders` turns them into batches on the training device.

An image folder is read as torchvision's ImageFolder reads one: files without an image extension
are skipped, every image is converted to RGB, and an image of another size than 32x32 is resized
and centre-cropped to 32x32 as the weights' transforms() do it (preresnet.pretrained.resize_center_crop).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .errors import UserError
from .pretrained import INPUT_SIZE, resize_center_crop
from .wording import counted

DATASETS = ("cifar10", "cifar100", "folder")
IMAGE_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
# the file names torchvision's ImageFolder takes for images (torchvision.datasets.folder.IMG_EXTENSIONS),
# compared in lower case; other files in a class folder are skipped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Split:
    images: np.ndarray  # N x 32 x 32 x 3, uint8, RGB
    labels: np.ndarray  # N, int64


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- CIFAR in the official python format --------------------------------------------------------


@dataclass(frozen=True)
class CifarSpec:
    url: str
    archive: str  # file name of the downloaded archive
    md5: str  # of the archive
    folder: str  # what the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path) -> None:
    """Fetch url into path through a temporary file, so an interrupted download leaves nothing."""
    tmp = path.with_name(path.name + ".part")
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, leave=False, disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"could not download {url} to {path} ({reason}); "
            f"without internet, copy the official archive there by hand"
        ) from None


def unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise UserError(f"{path} is missing: delete {path.parent} to extract the archive again") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path} is corrupt ({exc}): delete {path.parent} and its archive to fetch it again") from None


def read_cifar_batches(folder: Path, files: tuple[str, ...], label_key: bytes) -> Split:
    images, labels = [], []
    for name in files:
        batch = unpickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (KeyError, ValueError) as exc:
            raise UserError(f"{folder / name} is not a CIFAR batch ({exc!r}): delete {folder} and fetch it again") from None
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def extract(tar: tarfile.TarFile, root: Path, members=None) -> None:
    """Extract with tarfile's "data" filter (no absolute paths, links out or devices) where this
    Python has it (3.10.12, 3.11.4 and later); an older 3.10 or 3.11 extracts as it always did, which
    only archives checked against their published MD5 reach."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(root, members=members, **safe)


def extracted_cifar(spec: CifarSpec, root: Path, download_missing: bool) -> Path:
    """The folder of spec's extracted batches under root, downloading, MD5-checking and extracting the
    archive when a file is missing."""
    folder = root / spec.folder
    needed = spec.train_files + spec.test_files + (spec.meta_file,)
    if not all((folder / f).is_file() for f in needed):
        archive = root / spec.archive
        if not archive.is_file():
            if not download_missing:
                raise UserError(f"{archive} is missing: download {spec.url} there")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create data folder {root}: {exc.strerror}") from None
            download(spec.url, archive)
        md5 = file_md5(archive)
        if md5 != spec.md5:
            raise UserError(
                f"{archive} has MD5 {md5}, expected {spec.md5}: it is corrupt or not the official "
                f"archive; delete it and run again to download {spec.url}"
            )
        try:
            with tarfile.open(archive) as tar:
                extract(tar, root)
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"cannot extract {archive} ({exc}): delete it and run again") from None
    return folder


def cifar_classes(folder: Path, spec: CifarSpec, labels: np.ndarray) -> list[str]:
    """The class names of the archive's meta file, or "0", "1", ... where they do not name every label
    (the same rule for both splits and for one: load_split's classes are load_dataset's)."""
    meta = unpickle(folder / spec.meta_file)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(spec.names_key, [])]
    top = int(labels.max())
    return classes if top < len(classes) else [str(i) for i in range(top + 1)]


def load_cifar(name: str, data_dir: str | os.PathLike, download_missing: bool = True) -> Dataset:
    """Read CIFAR-10/100 from data_dir, downloading and MD5-checking the archive when not extracted."""
    spec = CIFAR_SPECS[name]
    folder = extracted_cifar(spec, Path(data_dir), download_missing)
    train = read_cifar_batches(folder, spec.train_files, spec.label_key)
    test = read_cifar_batches(folder, spec.test_files, spec.label_key)
    return Dataset(name, train, test, cifar_classes(folder, spec, np.concatenate([train.labels, test.labels])))


# --- image folders ------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_class_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class folders of split_dir (sorted) and their image files with their labels. Files
    without an image extension are skipped, as ImageFolder skips them, with one note naming them."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a folder: --dataset folder expects DIR/train/<class>/ and DIR/test/<class>/")
    try:
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise UserError(f"cannot read {split_dir}: {exc.strerror}") from None
    if not classes:
        raise UserError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    files, skipped = [], []
    for label, cls in enumerate(classes):
        try:
            names = sorted(p for p in (split_dir / cls).iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as exc:
            raise UserError(f"cannot read {split_dir / cls}: {exc.strerror}") from None
        images = [path for path in names if is_image_file(path)]
        skipped += [path for path in names if not is_image_file(path)]
        if not images:
            raise UserError(f"class folder {split_dir / cls} holds no images (files named *{', *'.join(IMAGE_EXTENSIONS)})")
        files.extend((path, label) for path in images)
    if skipped:
        shown = ", ".join(str(path.relative_to(split_dir)) for path in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"note: skipped {counted(len(skipped), 'file')} of {split_dir} without an image extension ({shown}{more}), "
              f"as torchvision's ImageFolder skips them", file=sys.stderr)
    return classes, files


def decode_image(path: Path) -> tuple[np.ndarray, bool]:
    """The image at path as 32 x 32 x 3 uint8 RGB, and whether it had to be converted or resized: any
    other mode is converted to RGB (ImageFolder's loader does it), any other size resized and
    centre-cropped as the weights' transforms() do it."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
            changed = image.mode != "RGB"
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    if array.shape != IMAGE_SHAPE:
        chw = torch.from_numpy(array.copy()).permute(2, 0, 1)  # np.asarray of a PIL image is read-only
        array = resize_center_crop(chw).permute(1, 2, 0).numpy()
        changed = True
    return array, changed


def decode_images(files: list[tuple[Path, int]], where: Path | None = None) -> Split:
    """The images of files (path, label) in order; one note on stderr counts those converted to RGB
    or resized to 32x32 (where: the folder it names)."""
    images = np.empty((len(files), *IMAGE_SHAPE), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    changed = []
    for i, (path, label) in enumerate(files):
        images[i], was_changed = decode_image(path)
        labels[i] = label
        if was_changed:
            changed.append(path)
    if changed:
        print(f"note: {len(changed)} of {counted(len(files), 'image')} in {where or changed[0].parent} were not 32x32 "
              f"RGB (such as {changed[0]}): converted to RGB where they were not (as torchvision's ImageFolder loads "
              f"them) and resized and centre-cropped to 32x32 where they had another size (as the weights' "
              f"transforms() do)", file=sys.stderr)
    return Split(images, labels)


def folder_fingerprint(root: Path, files: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha1()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_cache(cache: Path, fingerprint: str, count: int) -> Split | None:
    """The decoded images a cache file holds for these files (fingerprint, count), or None where it
    holds other files' or cannot be read: truncated, empty, not an npz, arrays of the wrong shape."""
    try:
        with np.load(cache, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            split = Split(cached["images"], cached["labels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if split.images.shape != (count, *IMAGE_SHAPE) or split.images.dtype != np.uint8 or split.labels.shape != (count,):
        return None
    return split


def load_folder_split(root: Path, split: str, files: list[tuple[Path, int]]) -> Split:
    """Decode root/split's files once; later calls read the cached uint8 array next to the data (an
    unreadable cache is decoded and written again)."""
    fingerprint = folder_fingerprint(root, files)
    cache = root / f".preresnet-cache-{split}.npz"
    if cache.is_file():
        cached = read_cache(cache, fingerprint, len(files))
        if cached is not None:
            return cached
    print(f"decoding {len(files)} images in {root / split} (cached after the first time)", file=sys.stderr)
    data = decode_images(files, root / split)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, images=data.images, labels=data.labels, fingerprint=np.array(fingerprint))
        os.replace(tmp, cache)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        print(f"note: cannot cache decoded images in {cache} ({exc.strerror}); they will be decoded again next time", file=sys.stderr)
    return data


def folder_split_files(data_dir: str | os.PathLike, split: str) -> tuple[Path, list[str], list[tuple[Path, int]]]:
    """The folder, its split's class names and image files (split: train or test), nothing decoded."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    return (root, *list_class_files(root / split))


def load_folder(data_dir: str | os.PathLike) -> Dataset:
    # Check the layout of both splits before the slow decoding of either.
    root, classes, train_files = folder_split_files(data_dir, "train")
    _, test_classes, test_files = folder_split_files(data_dir, "test")
    if test_classes != classes:
        raise UserError(f"{root}/train and {root}/test must hold the same class folders; got {classes} and {test_classes}")
    return Dataset("folder", load_folder_split(root, "train", train_files), load_folder_split(root, "test", test_files),
                   classes)


def data_label(name: str, data_dir: str | os.PathLike) -> str:
    """What a run trained on, in a title or a line: the dataset's name, or an image folder's own name
    ('cifar10-jpeg'), which says more than 'folder'."""
    return Path(data_dir).name if name == "folder" else name


def load_dataset(name: str, data_dir: str | os.PathLike, download_missing: bool = True) -> Dataset:
    """`cifar10` | `cifar100` (official archives under data_dir) | `folder` (data_dir/{train,test}/<class>/)."""
    if name == "folder":
        return load_folder(data_dir)
    if name in CIFAR_SPECS:
        return load_cifar(name, data_dir, download_missing)
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def load_split(name: str, data_dir: str | os.PathLike, split: str,
               download_missing: bool = True) -> tuple[Split, list[str]]:
    """One split ("train" or "test") of load_dataset's dataset and its class names, reading nothing
    of the other split (no decoding, no decode cache, no batches), so that evaluating on the test
    split costs only the test split; an image folder then needs only its DATA_DIR/SPLIT/<class>/."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}: choose train or test")
    if name == "folder":
        root, classes, files = folder_split_files(data_dir, split)
        return load_folder_split(root, split, files), classes
    if name in CIFAR_SPECS:
        spec = CIFAR_SPECS[name]
        folder = extracted_cifar(spec, Path(data_dir), download_missing)
        data = read_cifar_batches(folder, spec.train_files if split == "train" else spec.test_files, spec.label_key)
        return data, cifar_classes(folder, spec, data.labels)
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def data_sha256(dataset: Dataset) -> str:
    """sha256 of what a run trains and tests on: its class names, then each split's labels and uint8
    images in their order. The same data hashes alike wherever it lies (a moved --data-dir), and any
    other image, label, class name or order does not."""
    digest = hashlib.sha256(json.dumps(dataset.classes).encode())
    for split in (dataset.train, dataset.test):
        for array in (split.labels.astype(np.int64), split.images):
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def channel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 HWC images, in the 0-1 scale."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()
