"""Batches of normalised, augmented CIFAR images straight into the tensors the model consumes.

Two backends with one semantics: `torch` (tensor ops on the training device) and `dali` (an NVIDIA
DALI pipeline whose operators run on the GPU, or on the CPU with device_id=None as in the tests).
Both take every random decision from one `EpochPlan` drawn with numpy from (seed, epoch): the order
of the epoch, each image's crop offset and flip. So the backends give the same batches for the same
seed, and a resumed run sees exactly the data an uninterrupted one sees.

`--loader auto` (`auto_backend`) takes the torch loader: on the CPU DALI was measured no faster, and
on a GPU DALI's pipeline has not yet run (`--loader dali` takes it when asked for).

Sharding for multi-process training follows the global batch: each epoch has one permutation for
all ranks, global batch s is order[s*G:(s+1)*G] with G = batch_size * world_size, and rank r takes
the r-th slice of it. The shards are disjoint, cover the epoch, change every epoch, and together
make up exactly the batches of a single process with batch G.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .data import IMAGE_SHAPE
from .errors import UserError

CROP_PADDING = 4
CROP_PADDINGS = ("zeros", "reflect")  # the recipe's crop_padding (preresnet/recipes.py)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
BACKENDS = ("auto", "dali", "torch")
DATA_STREAM, MODEL_STREAM = 0, 1


def epoch_seed(seed: int, epoch: int, stream: int = DATA_STREAM, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for one epoch and stream (data order and augmentation, or the
    model's own randomness such as dropout, which differs per rank): all of an epoch's randomness
    follows from (seed, epoch), so a run resumed at an epoch boundary draws exactly what an
    uninterrupted one draws."""
    entropy = [seed, epoch, stream] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class EpochPlan:
    """Which images each batch of this rank holds and how each is augmented."""

    batches: list[np.ndarray]  # per batch, indices into the images, int64
    offsets: np.ndarray | None  # N x 2 crop offsets (row, col) in 0..2*CROP_PADDING, int32; None: no augmentation
    flips: np.ndarray | None  # N, bool: mirror horizontally


def plan_epoch(count: int, batch_size: int, train: bool, seed: int, epoch: int, rank: int = 0,
               world_size: int = 1) -> EpochPlan:
    """Training: one permutation of all images shared by the ranks, last incomplete global batch
    dropped, an independent crop and flip for every image. Evaluation: this rank's contiguous
    share of the images, in order, last partial batch kept."""
    if not train:
        shard = np.array_split(np.arange(count, dtype=np.int64), world_size)[rank]
        return EpochPlan([shard[i : i + batch_size] for i in range(0, len(shard), batch_size)], None, None)
    rng = np.random.Generator(np.random.PCG64(epoch_seed(seed, epoch)))
    order = rng.permutation(count).astype(np.int64)
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(count, 2), dtype=np.int32)
    flips = rng.integers(0, 2, size=count).astype(bool)
    global_batch = batch_size * world_size
    batches = [order[s * global_batch + rank * batch_size : s * global_batch + (rank + 1) * batch_size]
               for s in range(count // global_batch)]
    return EpochPlan(batches, offsets, flips)


def to_layout(x_nhwc: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """NHWC storage seen as NCHW is already channels-last; otherwise make it NCHW-contiguous."""
    x = x_nhwc.permute(0, 3, 1, 2).to(dtype)
    return x if channels_last else x.contiguous()


def pad_reflect(images: np.ndarray, padding: int = CROP_PADDING) -> np.ndarray:
    """uint8 N x H x W x C images with a border of `padding` pixels mirrored from inside the image
    (the edge pixel not repeated: Torch's SpatialReflectionPadding, torchvision's
    Pad(padding_mode="reflect")), done once at load time: reflection commutes with the per-channel
    normalisation, so a crop of the padded image normalised is the authors' normalise-pad-crop."""
    return np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")


def random_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: int = IMAGE_SHAPE[0]) -> torch.Tensor:
    """size x size crops of a padded NHWC batch at offsets (B x 2: row, col), mirrored where flips is
    true: one gather for the whole batch."""
    rows = offsets[:, 0, None] + torch.arange(size, device=x.device)  # B x size
    steps = torch.arange(size, device=x.device)
    steps = torch.where(flips[:, None], size - 1 - steps, steps)  # B x size, reversed where flipped
    cols = offsets[:, 1, None] + steps
    index = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[index, rows[:, :, None], cols[:, None, :]]


def pad_zeros(x: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """A normalised NHWC batch with a border of zeros: the mean colour (fb.resnet.torch's RandomCrop
    pads after ColorNormalize)."""
    return torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))


class BaseLoader:
    """Re-iterable: each iteration is one epoch of (x, y); set_epoch(e) before it picks the draws."""

    backend = ""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, train: bool,
                 device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_padding: str = "zeros"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise UserError(f"images must be a uint8 array N x 32 x 32 x 3 (HWC), got {images.dtype} {images.shape}")
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise UserError(f"{len(images)} images but labels of shape {labels.shape}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if train and batch_size * world_size > len(images):
            raise UserError(f"batch size {batch_size} x {world_size} process(es) is impossible for "
                            f"{len(images)} training images")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"mean and std must be 3 per-channel values, std positive; got {mean}, {std}")
        if crop_padding not in CROP_PADDINGS:
            raise UserError(f"unknown crop padding {crop_padding!r}: choose one of {', '.join(CROP_PADDINGS)}")
        # Training crops read a padded image: reflection is stored padded (once, as uint8), zeros are
        # added after normalising; evaluation reads the images as they are.
        self.crop_padding = crop_padding
        self.prepadded = train and crop_padding == "reflect"
        self.images_np = pad_reflect(images) if self.prepadded else np.ascontiguousarray(images)
        self.labels_np = labels.astype(np.int64)
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.channels_last, self.dtype = channels_last, dtype
        # The same float32 constants in both backends: their results are bit-identical.
        self.mean255 = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
        self.std255 = np.asarray(std, dtype=np.float32) * np.float32(255.0)
        self.epoch = 0
        self.first_batch = 0

    def reseeded(self, seed: int) -> "BaseLoader":
        """The same loader with another seed's data order and augmentation, sharing the images (and
        their copy on the device) with this one: the packed runs of a command hold the data once."""
        loader = copy.copy(self)
        loader.seed, loader.epoch, loader.first_batch = seed, 0, 0
        return loader

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Draw epoch's plan on the next iteration; first_batch > 0 skips that many of its batches
        (a run resumed inside an epoch), without changing the draws of the others."""
        self.epoch, self.first_batch = epoch, first_batch

    def plan(self) -> EpochPlan:
        plan = plan_epoch(len(self.images_np), self.batch_size, self.train, self.seed, self.epoch,
                          self.rank, self.world_size)
        plan.batches = plan.batches[self.first_batch:]
        return plan

    def __len__(self) -> int:
        count = len(self.images_np)
        if self.train:
            return count // (self.batch_size * self.world_size)
        share = len(np.array_split(np.arange(count), self.world_size)[self.rank])
        return -(-share // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (the dropped remainder does not count)."""
        if self.train:
            return len(self) * self.batch_size
        return len(np.array_split(np.arange(len(self.images_np)), self.world_size)[self.rank])


class TorchLoader(BaseLoader):
    """The whole dataset on the device as uint8; each batch gathered, normalised, cropped and
    flipped there with a few tensor ops (no per-sample Python work)."""

    backend = "torch"

    def __init__(self, images, labels, **kwargs):
        super().__init__(images, labels, **kwargs)
        self.images = torch.from_numpy(self.images_np).to(self.device)
        self.labels = torch.from_numpy(self.labels_np).to(self.device)
        self.mean = torch.from_numpy(self.mean255).to(self.device)
        self.std = torch.from_numpy(self.std255).to(self.device)

    def __iter__(self):
        plan = self.plan()
        if plan.offsets is not None:
            offsets = torch.from_numpy(plan.offsets).to(self.device)
            flips = torch.from_numpy(plan.flips).to(self.device)
        for batch in plan.batches:
            index = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = (self.images[index].float() - self.mean) / self.std
            if plan.offsets is not None:
                x = random_crop_flip(x if self.prepadded else pad_zeros(x), offsets[index], flips[index])
            yield to_layout(x, self.channels_last, self.dtype), self.labels[index]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_wheel() -> str:
    """The DALI build for this torch: DALI's wheels are per CUDA major version (cuda120, cuda130);
    a CPU build of torch runs DALI's CPU pipeline, which either has (the `dali` extra's is cuda130)."""
    return "nvidia-dali-cuda120" if (torch.version.cuda or "").split(".")[0] == "12" else "nvidia-dali-cuda130"


def dali_missing_message(what: str) -> str:
    cuda = f"the build for this torch's CUDA {torch.version.cuda}" if torch.version.cuda else "this torch is a CPU build"
    return f"{what} needs NVIDIA DALI: pip install {dali_wheel()} ({cuda}), or use --loader torch"


def auto_backend(device: torch.device | str) -> tuple[str, str]:
    """The backend `auto` means on device, and why: the torch loader. On the CPU the DALI CPU pipeline
    gives the same batches and was measured no faster (bench/results/2026-11-27-cpu/: 27,471 against
    28,283 images/s), and its worker threads would share the cores with the training step. On a GPU
    DALI's pipeline is tested on the CPU only: it has not yet run on a GPU."""
    if torch.device(device).type != "cuda":
        return "torch", "on the CPU the torch loader (the DALI CPU pipeline gives the same batches, measured no faster)"
    return "torch", "the torch loader: DALI's GPU pipeline has not yet run on a GPU (--loader dali takes it)"


def dali_augment(images, offsets, flips, mean255: np.ndarray, std255: np.ndarray, train: bool, prepadded: bool):
    """The DALI graph: normalise, then (training) a 32x32 window at offsets in the padded image,
    then the mirror. Images stored padded by reflection (prepadded) hold the window; otherwise it
    is taken at offset-4 in the unpadded image and padded with 0 (the mean colour) where it leaves
    it. The operators run wherever `images` lives, CPU or GPU."""
    from nvidia.dali import fn, types

    x = (fn.cast(images, dtype=types.FLOAT) - mean255) / std255
    if train:
        x = fn.slice(x, start=offsets if prepadded else offsets - CROP_PADDING, shape=list(IMAGE_SHAPE[:2]),
                     axes=[0, 1], out_of_bounds_policy="pad", fill_values=0.0)
        x = fn.flip(x, horizontal=flips)
    return x


class DaliLoader(BaseLoader):
    """The same batches through an NVIDIA DALI pipeline. The host gathers each batch's uint8
    images (3 KB each) and its draws; everything after that runs in DALI on `device`."""

    backend = "dali"

    def __init__(self, images, labels, **kwargs):
        super().__init__(images, labels, **kwargs)
        if not dali_available():
            raise UserError(dali_missing_message("the dali backend"))
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if on_gpu else None
        mean255, std255, train, prepadded = self.mean255, self.std255, self.train, self.prepadded

        @pipeline_def(batch_size=self.batch_size, num_threads=2, device_id=device_id, exec_dynamic=True,
                      prefetch_queue_depth=1)
        def pipeline():
            images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
            offsets = fn.external_source(name="offsets", dtype=types.INT32) if train else None
            flips = fn.external_source(name="flips", dtype=types.INT32) if train else None
            if on_gpu:  # the only line that differs between the CPU tests and GPU training
                images = images.gpu()
            return dali_augment(images, offsets, flips, mean255, std255, train, prepadded)

        self.pipeline = pipeline()
        self.pipeline.build()
        self.labels = torch.from_numpy(self.labels_np).to(self.device)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        plan = self.plan()
        for batch in plan.batches:
            self.pipeline.feed_input("images", self.images_np[batch])
            if self.train:
                self.pipeline.feed_input("offsets", plan.offsets[batch])
                self.pipeline.feed_input("flips", plan.flips[batch].astype(np.int32))
            (out,) = self.pipeline.run()
            x = torch.empty((len(batch), *IMAGE_SHAPE), dtype=torch.float32, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(out.as_tensor(), x, cuda_stream=stream)
            yield to_layout(x, self.channels_last, self.dtype), self.labels[torch.from_numpy(batch).to(self.device)]


def build_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int, train: bool, backend: str = "auto",
                 device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, mean=None, std=None,
                 crop_padding: str = "zeros") -> BaseLoader:
    """A re-iterable loader over uint8 images (N x 32 x 32 x 3, HWC) and int labels (N).

    Each iteration is one epoch of (x, y): x of `dtype`, N x 3 x 32 x 32 (channels-last memory when
    asked) on `device`, y int64. backend: dali, torch, or auto (`auto_backend`: the torch loader).
    mean/std are per-channel in the 0-1 scale, CIFAR-10's by default. crop_padding: how a training
    crop's 4-pixel border is filled, "zeros" (the mean colour) or "reflect" (the image mirrored).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown loader backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend, _ = auto_backend(device)
    cls = DaliLoader if backend == "dali" else TorchLoader
    return cls(images, labels, batch_size=batch_size, train=train, device=device, seed=seed, rank=rank,
               world_size=world_size, channels_last=channels_last, dtype=dtype,
               mean=CIFAR10_MEAN if mean is None else mean, std=CIFAR10_STD if std is None else std,
               crop_padding=crop_padding)
