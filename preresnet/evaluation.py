"""Evaluation: a network's test loss, error and per-class accuracy over a loader (the training
loop's end of epoch), and over the test split of a dataset on disk (eval.py, export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .data import data_label, load_split
from .errors import UserError
from .loaders import BaseLoader, build_loader
from .runtime import Runtime

EVAL_BATCH_SIZE = 500


def evaluate(model: torch.nn.Module, loader: BaseLoader, runtime: Runtime, num_classes: int) -> dict:
    """Test loss and error over every sample of loader once, with per-class accuracy."""
    model.eval()
    device = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    count = torch.zeros(num_classes, dtype=torch.int64, device=device)
    with torch.no_grad(), runtime.autocast():
        for x, y in loader:
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            hits = (logits.argmax(1) == y).long()
            correct.index_add_(0, y, hits)
            count.index_add_(0, y, torch.ones_like(y))
    for tensor in (loss_sum, correct, count):  # every rank evaluated its own share of the test set
        distributed.all_reduce_sum(tensor)
    total = int(count.sum())
    return {
        "test_loss": float(loss_sum) / total,
        "test_error": 1.0 - int(correct.sum()) / total,
        "per_class_accuracy": [(int(c) / int(n)) if n else None for c, n in zip(correct, count)],
        "test_images": total,
    }


@dataclass
class EvaluatedSplit:
    """What evaluate_test_split evaluated: the model's classes, the labels of the test images in the
    data's order as the model numbers the classes, and the model's logits where they were kept."""

    classes: list[str]
    labels: np.ndarray  # N, int64
    logits: torch.Tensor | None  # N x classes, float32, on the CPU
    # how the data's labels became the model's: "" (the same classes), "reordered" (the model's classes
    # in another order), "subset" (some of the model's classes; the others have no image to score)
    mapped: str


def model_labels(data_classes: list[str], labels: np.ndarray, classes: list[str], data: str,
                 network: str) -> np.ndarray:
    """labels of data_classes as numbers of the model's classes: the model's classes in another order,
    or some of them, are mapped by name; a class the model does not know is a UserError (a figure
    over classes it was not trained on means nothing)."""
    if data_classes == classes:
        return labels
    unknown = [name for name in data_classes if name not in classes]
    if unknown:
        missing = [name for name in classes if name not in data_classes]
        detail = " and ".join([f"it has {shown_names(unknown)}"] + ([f"it lacks {shown_names(missing)}"] if missing else []))
        raise UserError(f"the classes of {data} are not the ones {network} was trained on: {detail} (evaluate it on "
                        f"data with its classes: {shown_names(classes)}, or some of them)")
    return np.array([classes.index(name) for name in data_classes], dtype=np.int64)[labels]


def shown_names(names: list[str], shown: int = 6) -> str:
    """'a', 'b', 'c' and 7 more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def evaluate_test_split(model: torch.nn.Module, dataset_name: str, data_dir: str | os.PathLike, mean, std, runtime,
                        batch_size: int = EVAL_BATCH_SIZE, classes: list[str] | None = None,
                        keep_logits: bool = False) -> tuple[dict, EvaluatedSplit]:
    """model's test loss, error and per-class accuracy over the test split of dataset_name in
    data_dir (only that split is read), normalised with mean and std (eval.py and export share it).
    classes: the model's (its config's or entry's); the data's classes are checked against them, and
    labels mapped where the data holds them in another order or some of them (then only those are
    scored: the per-class accuracy of the others is None, and a prediction of one of them is an
    error). The model runs in runtime's precision and memory layout. Returns the figures and an
    EvaluatedSplit."""
    split, data_classes = load_split(dataset_name, data_dir, "test")
    num_classes = model.fc.out_features
    if classes is None:
        if len(data_classes) != num_classes:
            raise UserError(f"{dataset_name} in {data_dir} has {len(data_classes)} classes; this {model.paper_name} "
                            f"classifies {num_classes}")
        classes = data_classes
    labels = model_labels(data_classes, split.labels, list(classes), data_label(dataset_name, data_dir),
                          model.paper_name)
    loader = build_loader(split.images, labels, batch_size=batch_size, train=False, backend=runtime.loader, mean=mean,
                          std=std, device=runtime.device, channels_last=runtime.channels_last)
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    chunks = []
    # evaluate() sees every test image once, in order: its forward passes' outputs are the logits
    hook = model.register_forward_hook(lambda module, inputs, output: chunks.append(output.float().cpu())) \
        if keep_logits else None
    try:
        results = evaluate(model.to(runtime.device, memory_format=layout), loader, runtime, num_classes)
    finally:
        if hook is not None:
            hook.remove()
    logits = torch.cat(chunks) if keep_logits else None
    mapped = "" if data_classes == list(classes) else "reordered" if len(data_classes) == len(classes) else "subset"
    return results, EvaluatedSplit(list(classes), labels, logits, mapped)
