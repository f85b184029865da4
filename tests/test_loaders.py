"""Tests for preresnet.loaders: both backends (torch, and DALI on the CPU) against an independent
reference, and against each other; on a GPU (`pytest -m gpu`) DALI's GPU pipeline against the torch
loader on the GPU; what `--loader auto` takes, and why."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from preresnet import loaders
from preresnet.errors import UserError

needs_dali = pytest.mark.skipif(not loaders.dali_available(),
                                reason=f"NVIDIA DALI is not installed (pip install {loaders.dali_wheel()})")


@pytest.fixture(params=["torch", pytest.param("dali", marks=needs_dali)])
def backend(request) -> str:
    return request.param


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


# --- Loader ---------------------------------------------------------------------------------------

MEAN = [0.3, 0.55, 0.7]
STD = [0.2, 0.25, 0.31]
N = 24


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_images(np.random.default_rng(7), N)


def normalise(images: np.ndarray) -> np.ndarray:
    """Reference normalisation in float32, the same operations as the loader (HWC)."""
    mean = np.asarray(MEAN, dtype=np.float32) * np.float32(255.0)
    std = np.asarray(STD, dtype=np.float32) * np.float32(255.0)
    return (images.astype(np.float32) - mean) / std


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.float().permute(0, 2, 3, 1).contiguous().numpy()


def make_loader(backend, images, labels=None, **kwargs) -> loaders.BaseLoader:
    kwargs.setdefault("mean", MEAN)
    kwargs.setdefault("std", STD)
    if labels is None:
        labels = np.arange(len(images))
    return loaders.build_loader(images, labels, backend=backend, **kwargs)


def crop_table(images: np.ndarray, padding: str = "zeros") -> dict[bytes, tuple[int, bool, int, int]]:
    """All 2 x 81 crops of every padded normalised source, keyed by their bytes: normalised, then
    padded with zeros (fb.resnet.torch's ColorNormalize, then RandomCrop's zero border) or with the
    image mirrored at its edges (Zagoruyko & Komodakis: normalised, then SpatialReflectionPadding)."""
    table = {}
    pad = loaders.CROP_PADDING
    mode = {"zeros": "constant", "reflect": "reflect"}[padding]
    for i, img in enumerate(normalise(images)):
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
        for flip, source in ((False, padded), (True, padded[:, ::-1])):
            for r in range(2 * pad + 1):
                for c in range(2 * pad + 1):
                    key = np.ascontiguousarray(source[r : r + 32, c : c + 32]).tobytes()
                    assert key not in table  # random content: every candidate is distinct
                    table[key] = (i, flip, r, c)
    return table


def test_reflection_padding_by_hand():
    """One row worked by hand: a border of 4 mirrors pixels 4, 3, 2, 1 (the edge is not repeated)."""
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, :, 0] = np.arange(32)
    padded = loaders.pad_reflect(image)
    assert padded.shape == (1, 40, 40, 3)
    assert padded[0, 4, :, 0].tolist() == [4, 3, 2, 1, *range(32), 30, 29, 28, 27]
    assert padded[0, 0, 4:36, 0].tolist() == [0] * 32  # row 4 of the image, mirrored to the top


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_train_augmentation_is_a_pad_crop_flip(backend, images, padding):
    table = crop_table(images, padding)
    loader = make_loader(backend, images, batch_size=8, train=True, seed=11, crop_padding=padding)
    rows, cols, pairs, flips = Counter(), Counter(), Counter(), Counter()
    epochs = 60
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        seen = []
        for x, y in loader:
            assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
            for out, label in zip(hwc(x), y.tolist()):
                match = table.get(out.tobytes())
                assert match is not None, f"epoch {epoch}: output for image {label} is no pad-crop-flip of it"
                source, flip, r, c = match
                assert source == label
                rows[r] += 1
                cols[c] += 1
                pairs[r, c] += 1
                flips[flip] += 1
                seen.append(label)
        assert sorted(seen) == list(range(N))
    draws = epochs * N  # 1440: 160 expected per offset (sd ~12), 720 per flip (sd ~19)
    assert sorted(rows) == sorted(cols) == list(range(9))
    assert len(pairs) == 81  # every (row, col) pair occurs, ~18 expected each
    for counter in (rows, cols):
        assert all(100 <= n <= 220 for n in counter.values()), counter
    assert set(flips) == {False, True}
    assert 620 <= flips[True] <= 820, flips
    assert sum(flips.values()) == draws


@pytest.mark.parametrize("n,batch_size", [(24, 1), (24, 8), (24, 24), (24, 5), (24, 7), (24, 23), (10, 3)])
def test_train_epoch_covers_each_sample_once(backend, images, n, batch_size):
    loader = make_loader(backend, images[:n], batch_size=batch_size, train=True, seed=1)
    assert len(loader) == n // batch_size
    assert loader.num_samples == (n // batch_size) * batch_size
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == n // batch_size
        labels = []
        for x, y in batches:
            assert x.shape == (batch_size, 3, 32, 32)
            assert y.shape == (batch_size,) and y.dtype == torch.int64
            labels.extend(y.tolist())
        assert len(set(labels)) == len(labels) == (n // batch_size) * batch_size
        assert set(labels) <= set(range(n))
        if n % batch_size == 0:
            assert sorted(labels) == list(range(n))


def epoch_batches(loader: loaders.BaseLoader, epoch: int):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_train_order_changes_with_epoch_and_is_reproducible(backend, images):
    loader = make_loader(backend, images, batch_size=6, train=True, seed=5)
    orders = [torch.cat([y for _, y in epoch_batches(loader, e)]).tolist() for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4  # different permutations each epoch
    again = torch.cat([y for _, y in epoch_batches(loader, 2)]).tolist()
    assert again == orders[2]  # going back to an epoch reproduces it


def test_train_same_seed_same_batches_other_seed_different(backend, images):
    a = epoch_batches(make_loader(backend, images, batch_size=6, train=True, seed=5), 3)
    b = epoch_batches(make_loader(backend, images, batch_size=6, train=True, seed=5), 3)
    c = epoch_batches(make_loader(backend, images, batch_size=6, train=True, seed=6), 3)
    assert len(a) == len(b) == len(c) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    # with the same order forced, the augmentation draws differ too
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


@pytest.mark.parametrize("batch_size", [1, 5, 7, 24, 30])
def test_eval_in_order_without_augmentation(backend, images, batch_size):
    loader = make_loader(backend, images, batch_size=batch_size, train=False, seed=9)
    expected = normalise(images)
    n_batches = -(-N // batch_size)
    assert len(loader) == n_batches
    assert loader.num_samples == N
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        xs, ys = zip(*loader)
        assert len(xs) == n_batches
        assert [len(y) for y in ys] == [batch_size] * (n_batches - 1) + [N - batch_size * (n_batches - 1)]
        y = torch.cat(ys)
        assert y.dtype == torch.int64 and y.tolist() == list(range(N))
        x = torch.cat(xs)
        assert x.shape == (N, 3, 32, 32) and x.dtype == torch.float32
        np.testing.assert_array_equal(hwc(x), expected)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_memory_format_and_dtype(backend, images, train, batch_size):
    kwargs = dict(batch_size=batch_size, train=train, seed=2)
    plain = epoch_batches(make_loader(backend, images, **kwargs), 1)
    cl = epoch_batches(make_loader(backend, images, channels_last=True, **kwargs), 1)
    bf = epoch_batches(make_loader(backend, images, dtype=torch.bfloat16, **kwargs), 1)
    bf_cl = epoch_batches(make_loader(backend, images, dtype=torch.bfloat16, channels_last=True, **kwargs), 1)
    for (x, y), (xc, yc), (xb, yb), (xbc, ybc) in zip(plain, cl, bf, bf_cl):
        assert x.dtype == xc.dtype == torch.float32
        assert xb.dtype == xbc.dtype == torch.bfloat16
        assert x.shape == xc.shape == xb.shape == xbc.shape == (batch_size, 3, 32, 32)
        assert x.is_contiguous()
        assert xb.is_contiguous()
        assert xc.is_contiguous(memory_format=torch.channels_last)
        assert xbc.is_contiguous(memory_format=torch.channels_last)
        if batch_size > 1:
            assert not xc.is_contiguous()
        assert torch.equal(x, xc)
        assert torch.equal(xb, x.to(torch.bfloat16)) and torch.equal(xbc, xb)
        for labels in (y, yc, yb, ybc):
            assert labels.dtype == torch.int64
        assert torch.equal(y, yc) and torch.equal(y, yb) and torch.equal(y, ybc)


def test_loader_accepts_list_labels_and_keeps_them(backend, images):
    labels = [int(v) for v in (np.arange(N) * 7) % 10]
    loader = make_loader(backend, images, labels, batch_size=N, train=False)
    (_, y), = list(loader)
    assert y.dtype == torch.int64 and y.tolist() == labels


def test_eval_batch_larger_than_data_is_one_batch(backend, images):
    loader = make_loader(backend, images[:5], batch_size=64, train=False)
    assert len(loader) == 1
    (x, y), = list(loader)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == list(range(5))


@pytest.mark.parametrize("case", ["float-images", "nchw", "grayscale", "3d", "int16", "labels-short",
                                  "labels-long", "batch-too-big", "batch-zero", "batch-zero-eval",
                                  "batch-negative"])
def test_loader_errors(backend, images, case):
    kwargs = dict(batch_size=8, train=True)
    imgs, labels = images, np.arange(N)
    if case == "float-images":
        imgs = images.astype(np.float32)
    elif case == "nchw":
        imgs = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    elif case == "grayscale":
        imgs = images[..., 0]
    elif case == "3d":
        imgs = images[0]
        labels = np.arange(32)
    elif case == "int16":
        imgs = images.astype(np.int16)
    elif case == "labels-short":
        labels = np.arange(N - 1)
    elif case == "labels-long":
        labels = np.arange(N + 1)
    elif case == "batch-too-big":
        kwargs["batch_size"] = N + 1
    elif case == "batch-zero":
        kwargs["batch_size"] = 0
    elif case == "batch-zero-eval":
        kwargs.update(batch_size=0, train=False)
    else:
        kwargs["batch_size"] = -3
    with pytest.raises(UserError):
        make_loader(backend, imgs, labels, **kwargs)


def test_epoch_seed_depends_on_all_inputs():
    seeds = {loaders.epoch_seed(s, e, st) for s in (0, 1) for e in (0, 1, 2) for st in (loaders.DATA_STREAM, loaders.MODEL_STREAM)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    assert loaders.epoch_seed(3, 4) == loaders.epoch_seed(3, 4, loaders.DATA_STREAM)


# --- both backends, sharding, selection -------------------------------------------------------------


@needs_dali
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rank, world_size, padding", [(0, 1, "zeros"), (1, 3, "zeros"), (0, 1, "reflect")])
def test_dali_and_torch_give_identical_batches(images, train, channels_last, rank, world_size, padding):
    kwargs = dict(batch_size=5, train=train, seed=4, channels_last=channels_last, rank=rank, world_size=world_size,
                  crop_padding=padding)
    for epoch in (0, 2):
        torch_batches = epoch_batches(make_loader("torch", images, **kwargs), epoch)
        dali_batches = epoch_batches(make_loader("dali", images, **kwargs), epoch)
        assert len(torch_batches) == len(dali_batches) > 0
        for (xt, yt), (xd, yd) in zip(torch_batches, dali_batches):
            assert torch.equal(yt, yd)
            assert torch.equal(xt, xd)
            assert xt.stride() == xd.stride()


@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 3), (4, 1)])
def test_training_shards_are_disjoint_and_make_up_the_single_process_batches(backend, images, world_size, batch_size):
    single = make_loader(backend, images, batch_size=batch_size * world_size, train=True, seed=8)
    shards = [make_loader(backend, images, batch_size=batch_size, train=True, seed=8, rank=r, world_size=world_size)
              for r in range(world_size)]
    for epoch in (0, 1):
        single_batches = epoch_batches(single, epoch)
        shard_batches = [epoch_batches(loader, epoch) for loader in shards]
        assert all(len(b) == len(single_batches) == N // (batch_size * world_size) for b in shard_batches)
        seen = [y.tolist() for batches in shard_batches for _, y in batches]
        flat = [label for labels in seen for label in labels]
        assert len(flat) == len(set(flat))  # disjoint
        for step, (x, y) in enumerate(single_batches):
            assert torch.equal(torch.cat([b[step][1] for b in shard_batches]), y)
            assert torch.equal(torch.cat([b[step][0] for b in shard_batches]), x)
    # the ranks' shares of one epoch are a fresh split next epoch
    assert [y.tolist() for _, y in epoch_batches(shards[0], 0)] != [y.tolist() for _, y in epoch_batches(shards[0], 1)]


@pytest.mark.parametrize("world_size", [2, 5, 7])
def test_evaluation_shards_cover_every_image_once_in_order(backend, images, world_size):
    labels = []
    for rank in range(world_size):
        loader = make_loader(backend, images, batch_size=3, train=False, rank=rank, world_size=world_size)
        ys = [y for _, y in loader]
        assert sum(len(y) for y in ys) == loader.num_samples
        labels.extend(torch.cat(ys).tolist())
    assert labels == list(range(N))


def test_auto_is_the_torch_loader_on_the_cpu_and_defaults_to_cifar10_statistics(images):
    loader = loaders.build_loader(images, np.arange(N), batch_size=N, train=False)
    assert loader.backend == "torch"
    (x, _), = list(loader)
    mean = np.asarray(loaders.CIFAR10_MEAN, np.float32) * np.float32(255)
    std = np.asarray(loaders.CIFAR10_STD, np.float32) * np.float32(255)
    np.testing.assert_array_equal(hwc(x), (images.astype(np.float32) - mean) / std)


def test_unknown_backend_and_bad_rank(images):
    with pytest.raises(UserError, match="unknown loader backend"):
        loaders.build_loader(images, np.arange(N), batch_size=4, train=True, backend="ffcv")
    with pytest.raises(UserError, match="rank 2"):
        loaders.build_loader(images, np.arange(N), batch_size=4, train=True, backend="torch", rank=2, world_size=2)
    with pytest.raises(UserError, match="impossible"):  # 4 x 8 processes > 24 images
        loaders.build_loader(images, np.arange(N), batch_size=4, train=True, backend="torch", world_size=8)


# --- the GPU pipeline (pytest -m gpu) ---------------------------------------------------------------


def assert_same_batches(reference, batches):
    assert len(reference) == len(batches) > 0
    for (xt, yt), (xd, yd) in zip(reference, batches):
        assert xd.is_cuda and yd.is_cuda
        assert torch.equal(yt, yd)
        assert torch.equal(xt, xd)
        assert xt.stride() == xd.stride()


@pytest.mark.gpu
@needs_dali
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_gpu_pipeline_gives_the_torch_loaders_batches_on_the_gpu(images, train, channels_last, padding):
    kwargs = dict(batch_size=5, train=train, seed=4, channels_last=channels_last, device="cuda", crop_padding=padding)
    dali = make_loader("dali", images, **kwargs)
    assert dali.pipeline.device_id == 0  # the operators run on the GPU, not DALI's CPU pipeline
    for epoch in (0, 2):
        assert_same_batches(epoch_batches(make_loader("torch", images, **kwargs), epoch), epoch_batches(dali, epoch))


@pytest.mark.gpu
@needs_dali
def test_gpu_pipeline_at_the_training_batch_size():
    images = random_images(np.random.default_rng(3), 1000)
    kwargs = dict(batch_size=128, train=True, seed=1, channels_last=True, device="cuda", labels=np.arange(1000) % 10)
    for epoch in (0, 1):
        assert_same_batches(epoch_batches(make_loader("torch", images, **kwargs), epoch),
                            epoch_batches(make_loader("dali", images, **kwargs), epoch))


@pytest.mark.gpu
@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_gpu_pipeline_sharded_for_two_ranks(images, train):
    single = make_loader("dali", images, batch_size=8, train=train, seed=8, device="cuda")
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            kwargs = dict(batch_size=4, train=train, seed=8, rank=rank, world_size=2, device="cuda")
            shard = epoch_batches(make_loader("dali", images, **kwargs), epoch)
            assert_same_batches(epoch_batches(make_loader("torch", images, **kwargs), epoch), shard)
            shards.append(shard)
        if train:  # rank r holds the r-th half of each global batch
            for step, (x, y) in enumerate(epoch_batches(single, epoch)):
                assert torch.equal(torch.cat([shards[0][step][1], shards[1][step][1]]), y)
                assert torch.equal(torch.cat([shards[0][step][0], shards[1][step][0]]), x)
        else:  # contiguous halves of the test set, in order
            assert torch.cat([y for shard in shards for _, y in shard]).tolist() == list(range(N))


# --- --loader auto ----------------------------------------------------------------------------------


def test_auto_is_the_torch_loader_on_a_gpu_too(monkeypatch):
    """DALI's GPU pipeline has not run on a GPU: auto never takes it, installed or not."""
    monkeypatch.setattr(loaders, "dali_available", lambda: True)
    backend, reason = loaders.auto_backend(torch.device("cuda"))
    assert backend == "torch" and "has not yet run on a GPU" in reason


def test_runtime_records_why_it_took_its_loader(tmp_path):
    from preresnet import run_setup
    from preresnet.recipes import resolve_recipe
    from preresnet.runtime import resolve_runtime

    runtime = resolve_runtime("cpu", "off", loader="auto")
    assert runtime.loader == "torch" and "on the CPU" in runtime.loader_reason
    assert resolve_runtime("cpu", "off", loader="torch").loader_reason == "--loader torch"
    run_setup.write_config(tmp_path, {"model": "x"}, resolve_recipe("paper"), runtime)
    saved = json.loads((tmp_path / "config.json").read_text())["runtime"]
    assert saved["loader"] == "torch" and saved["loader_reason"] == runtime.loader_reason


@pytest.mark.parametrize("cuda, wheel", [("13.0", "nvidia-dali-cuda130"), ("12.8", "nvidia-dali-cuda120"),
                                         (None, "nvidia-dali-cuda130")])
def test_a_missing_dali_names_the_wheel_for_this_torch(monkeypatch, cuda, wheel):
    from preresnet import runtime

    monkeypatch.setattr(torch.version, "cuda", cuda)
    for module in (loaders, runtime):
        monkeypatch.setattr(module, "dali_available", lambda: False)
    assert loaders.dali_wheel() == wheel
    with pytest.raises(UserError, match=f"--loader dali needs NVIDIA DALI: pip install {wheel} "):
        runtime.resolve_runtime("cpu", "off", loader="dali")
    with pytest.raises(UserError, match=f"pip install {wheel} "):
        loaders.build_loader(random_images(np.random.default_rng(0), 4), np.arange(4), batch_size=2, train=True,
                             backend="dali")
