"""Models for the training command: a small batch-norm CNN for the real image
sets (8x8 digits, 28x28 MNIST) and CIFAR-style ResNet-20/56 for 32x32x3 inputs.

Every model has batch norm, so the SAMPa rule for buffers (the x̃-pass
updates the running statistics, the y-pass does not) is exercised.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("cnn", "resnet20", "resnet56")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks, halving the resolution between stages until it is
    at most 4x4, then global average pooling and a linear classifier.

    8x8 inputs give two stages (8 -> 4), 28x28 three (28 -> 14 -> 7 -> 3).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"SmallCNN needs images of at least 4x4 pixels, got {image_size}x{image_size}")
        layers, cin, cout, size = [], in_channels, width, image_size
        while True:
            layers += [_conv_bn(cin, cout), _conv_bn(cout, cout)]
            cin = cout
            if size <= 4:
                break
            layers.append(nn.MaxPool2d(2))
            size //= 2
            cout = min(cout * 2, 4 * width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _BasicBlock(nn.Module):
    """The CIFAR ResNet block of He et al. (2016) with the parameter-free
    shortcut ("option A"): stride-2 subsampling and zero-padded channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n blocks per stage."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = _conv_bn(in_channels, 16)
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (stage and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """`name` in MODELS; `input_shape` is (channels, height, width)."""
    c, h, w = input_shape
    if name == "cnn":
        if h != w:
            raise ValueError(f"the cnn model takes square images, got {h}x{w}")
        # Narrower on larger images: the same CPU cost per step order of magnitude.
        return SmallCNN(c, num_classes, h, width=32 if h <= 16 else 16)
    if name in ("resnet20", "resnet56"):
        if (h, w) != (32, 32):
            raise ValueError(f"{name} is the CIFAR-style ResNet for 32x32 inputs, but this data set "
                             f"has {h}x{w} images; use --model cnn (or --dataset synthetic-cifar)")
        return CifarResNet(int(name[len("resnet"):]), c, num_classes)
    raise ValueError(f"unknown model {name!r}: choose one of {MODELS}")
