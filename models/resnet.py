"""Small ResNet (BasicBlock layout) with BatchNorm, residual adds and a Linear head.

The ``"bench"`` preset is exactly the ResNet-18 layout (11,689,512 parameters at
1000 classes, same as torchvision's ``resnet18``), so GPU numbers are comparable
with published ones.  Written out here rather than imported from torchvision so
the package has no torchvision dependency and the graph stays free of in-place ops.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "BatchNorm2d", "ResNet", "ResNetConfig", "SIZES", "from_preset"]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` minus its Python-side input-rank check, so fx can trace *through* it.

    Stock ``BatchNorm2d.forward`` starts with ``if input.dim() != 4: raise``,
    control flow on a traced value that makes ``torch.fx`` fail unless the module
    is a leaf.  Still an ``nn.BatchNorm2d`` (isinstance, state_dict, eval/train
    behaviour unchanged); the conv before it guarantees the rank anyway.

    Example:
        >>> BatchNorm2d(3)(torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


@dataclass
class ResNetConfig:
    """Architecture of a :class:`ResNet`; one entry of ``widths``/``blocks`` per stage.

    Example:
        >>> ResNetConfig(widths=(16, 32), blocks=(1, 1)).num_classes
        10
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 10
    in_channels: int = 3


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual add (1x1 conv+BN projection when the shape changes).

    Example:
        >>> BasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Example:
            >>> BasicBlock(4, 4)(torch.zeros(1, 4, 5, 5)).shape
            torch.Size([1, 4, 5, 5])
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: keeps the residual visible as a plain add node.
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet-style ResNet: 7x7/2 conv stem + 3x3/2 max-pool, BasicBlock stages, avg-pool, Linear.

    Example:
        >>> m = ResNet(ResNetConfig(widths=(8, 16), blocks=(1, 1)))
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        self.conv1 = nn.Conv2d(config.in_channels, w0, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        in_ch = w0
        for i, (width, n) in enumerate(zip(config.widths, config.blocks)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(in_ch, width, stride)]
            layer += [BasicBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            in_ch = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the mean cross-entropy when ``targets`` is given.

        Example:
            >>> m = ResNet(ResNetConfig(widths=(8,), blocks=(1,)))
            >>> m(torch.zeros(2, 3, 16, 16), torch.tensor([1, 2])).dim()
            0
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets)


# Model config plus example-input shape (``batch``, ``image_size``).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (16, 32), "blocks": (1, 1), "num_classes": 10, "batch": 4, "image_size": 32},
    "small": {
        "widths": (32, 64, 128),
        "blocks": (1, 1, 1),
        "num_classes": 100,
        "batch": 8,
        "image_size": 64,
    },
    "bench": {
        "widths": (64, 128, 256, 512),
        "blocks": (2, 2, 2, 2),
        "num_classes": 1000,
        "batch": 128,
        "image_size": 224,
    },
}


def from_preset(
    size: str,
    *,
    batch: int | None = None,
    generator: torch.Generator,
    with_targets: bool = False,
    **config: Any,
) -> tuple[ResNet, tuple[torch.Tensor, ...]]:
    """Build a :class:`ResNet` from a preset plus overrides (``image_size=`` sets the input H=W).

    Example:
        >>> m, (x,) = from_preset("tiny", generator=torch.Generator().manual_seed(1))
        >>> x.shape
        torch.Size([4, 3, 32, 32])
    """
    cfg = {**SIZES[size], **config}
    b = batch if batch is not None else cfg["batch"]
    hw = cfg.pop("image_size")
    cfg.pop("batch")
    known = {f.name for f in fields(ResNetConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise TypeError(f"unknown resnet config keys {sorted(unknown)}; valid: {sorted(known | {'image_size'})}")
    cfg["widths"], cfg["blocks"] = tuple(cfg["widths"]), tuple(cfg["blocks"])
    model = ResNet(ResNetConfig(**cfg))
    x = torch.randn(b, model.config.in_channels, hw, hw, generator=generator)
    if not with_targets:
        return model, (x,)
    y = torch.randint(0, model.config.num_classes, (b,), generator=generator)
    return model, (x, y)
