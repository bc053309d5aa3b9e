"""Import the peer libraries for parity tests; skip cleanly when absent.

zennit 1.0.0 imports torchvision at import time, and torchvision does not install beside the CPU
torch build used here (see ../shared/notes/measured-facts.md). When torchvision is missing, a
minimal stand-in module provides the names zennit touches, with ``BasicBlock`` and ``Bottleneck``
written to match torchvision's (same attributes and forward), so zennit's ResNet canonizer
applies to models built from them.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _install_torchvision_stub() -> None:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class FrozenBatchNorm2d(nn.Module):  # only used in isinstance checks by zennit
        pass

    ops.FrozenBatchNorm2d = FrozenBatchNorm2d
    resnet.BasicBlock = BasicBlock
    resnet.Bottleneck = Bottleneck
    models.resnet = resnet
    tv.ops, tv.models = ops, models
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.models": models,
                        "torchvision.models.resnet": resnet})


def zennit():
    """The zennit package, or skip."""
    try:
        importlib.import_module("torchvision")
    except Exception:
        _install_torchvision_stub()
    return pytest.importorskip("zennit")


def resnet_blocks():
    """The BasicBlock/Bottleneck classes zennit's ResNet canonizer recognises."""
    zennit()
    res = sys.modules["torchvision.models.resnet"]
    return res.BasicBlock, res.Bottleneck


def zennit_relevance(model, x, target, composite):
    """Zennit's relevance for ``target`` (one-hot seeded), in float64."""
    from zennit.attribution import Gradient

    out = model(x)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(target).expand(x.shape[0]), out.shape[1]).to(x.dtype)
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x.detach().clone().requires_grad_(), onehot)
    return rel.detach()
