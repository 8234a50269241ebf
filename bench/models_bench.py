"""Models for the step benchmarks, defined here (no torchvision).

- ResNet-56 for 32x32x3 inputs (He et al. 2016, the CIFAR variant: three
  stages of 9 basic blocks, 16/32/64 channels, parameter-free shortcuts),
  about 0.86 M parameters: a model that leaves an H100 mostly idle.
- WRN-28-10 (Zagoruyko & Komodakis 2016): pre-activation wide blocks,
  160/320/640 channels, about 36.5 M parameters; at batch 256 it fills an H100.
- Tiny variants of both for CPU smoke runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut; when the shape changes the
    shortcut subsamples and zero-pads channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1:
            short = short[:, :, ::self.stride, ::self.stride]
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 56, width: int = 16, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNetCifar depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if (stage > 0 and i == 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class WideBlock(nn.Module):
    """Pre-activation wide block: bn-relu-conv-bn-relu-conv plus a 1x1
    projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.short = (nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
                      if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        short = x if self.short is None else self.short(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout:
            o = F.dropout(o, self.dropout, self.training)
        return self.conv2(o) + short


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, c = [], widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBlock(c, c_out, 2 if (stage > 0 and i == 0) else 1, dropout))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@dataclass(frozen=True)
class BenchModel:
    name: str
    make: Callable[[], nn.Module]
    input_shape: Tuple[int, int, int]     # C, H, W
    batch: int
    classes: int
    note: str


MODELS = {
    "resnet56": BenchModel("resnet56", lambda: ResNetCifar(56, 16, 10), (3, 32, 32), 128, 10,
                           "(i) ResNet-56, 32x32x3, batch 128: leaves the GPU mostly idle"),
    "wrn28_10": BenchModel("wrn28_10", lambda: WideResNet(28, 10, 10), (3, 32, 32), 256, 10,
                           "(ii) WRN-28-10, 32x32x3, batch 256: fills the GPU"),
    # CPU smoke runs: the same code paths, tiny.
    "resnet8_tiny": BenchModel("resnet8_tiny", lambda: ResNetCifar(8, 4, 10), (3, 8, 8), 8, 10,
                               "smoke: ResNet-8, width 4, 8x8"),
    "wrn10_1_tiny": BenchModel("wrn10_1_tiny", lambda: WideResNet(10, 1, 10), (3, 8, 8), 8, 10,
                               "smoke: WRN-10-1, 8x8"),
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)
