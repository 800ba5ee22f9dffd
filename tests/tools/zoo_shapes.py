"""torchvision-layout blocks for the fuse tests (the same layouts as the model zoo, kept
independent of it): ResNet BasicBlock/Bottleneck, RegNet Y (SE), MobileNetV2 inverted
residual, MobileNetV3 block, and a small ResNet-18."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(cout, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride))

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

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = conv_bn(width, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = torch.add(identity, out)  # the other operand order, torch.add
        return torch.relu(out)


class SqueezeExcitation(nn.Module):
    def __init__(self, c, squeeze, gate=nn.Sigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.act = nn.ReLU()
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, group_width=8):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(cin, cout, 1), nn.ReLU(inplace=True))
        self.b = nn.Sequential(*conv_bn(cout, cout, 3, stride, cout // group_width),
                               nn.ReLU(inplace=True))  # fmt: skip
        self.se = SqueezeExcitation(cout, max(1, cin // 4))
        self.c = nn.Sequential(*conv_bn(cout, cout, 1))
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        r = x if self.proj is None else self.proj(x)
        return self.activation(r + self.c(self.se(self.b(self.a(x)))))


class InvertedResidual(nn.Module):  # MobileNetV2
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, hidden), nn.ReLU6(inplace=True),
            *conv_bn(hidden, cout, 1),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV3Block(nn.Module):
    def __init__(self, cin, hidden, cout, stride):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *conv_bn(cin, hidden, 1), nn.Hardswish(),
            *conv_bn(hidden, hidden, 3, stride, hidden), nn.Hardswish(),
            SqueezeExcitation(hidden, max(1, hidden // 4), nn.Hardsigmoid),
            *conv_bn(hidden, cout, 1),
        )  # fmt: skip

    def forward(self, x):
        out = self.block(x)
        if self.use_res:
            out += x
        return out


class Net(nn.Module):
    """stem conv-bn-relu, blocks, pooled linear head."""

    def __init__(self, blocks, cin, cout, classes=10):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, cin, 3)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cout, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


def resnet18(width=8, classes=10):
    """ResNet-18's layout (2-2-2-2 BasicBlocks, three downsampling stages; 20 BNs)."""
    blocks, c = [], width
    for stage, out in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for i in range(2):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(c, out, stride))
            c = out
    return Net(blocks, width, c, classes)


def models():
    """name → (factory, BN count, BNs expected fused)."""
    return {
        "resnet18": (lambda: resnet18(), 20, 17),
        "bottleneck": (lambda: Net([Bottleneck(8, 4), Bottleneck(16, 4, 2)], 8, 16), 9, 7),
        "regnety": (lambda: Net([RegNetYBlock(8, 16, 2), RegNetYBlock(16, 16)], 8, 16), 8, 7),
        "mobilenetv2": (
            lambda: Net([InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 2)], 8, 12),
            7,
            6,  # the last block has no residual: its projection BN feeds the head's mean
        ),
        "mobilenetv3": (
            lambda: Net([MobileNetV3Block(8, 16, 8, 1), MobileNetV3Block(8, 16, 12, 2)], 8, 12),
            7,
            6,
        ),
    }
