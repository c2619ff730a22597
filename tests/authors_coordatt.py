""" The authors' Coordinate Attention block, rebuilt from the spec (coordatt.md section 1).

Written independently of `timm_coordatt` in the authors' own formulation and parameter names
(`conv1`, `bn1`, `conv_h`, `conv_w`: AdaptiveAvgPool strips, permute, a hand-written hard-swish,
`identity * a_w * a_h`), as the reference for equivalence tests and the layer benchmark.
"""
import torch
from torch import nn


class HSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6()

    def forward(self, x):
        return self.relu(x + 3) / 6


class HSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmoid = HSigmoid()

    def forward(self, x):
        return x * self.sigmoid(x)


class _AuthorsCoordAttBase(nn.Module):
    def __init__(self, inp: int, reduction: int = 32):
        super().__init__()
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = HSwish()

    def forward(self, x):
        identity = x
        n, c, h, w = x.size()
        x_h = self.pool_h(x)
        x_w = self.pool_w(x).permute(0, 1, 3, 2)
        y = torch.cat([x_h, x_w], dim=2)
        y = self.act(self.bn1(self.conv1(y)))
        x_h, x_w = torch.split(y, [h, w], dim=2)
        x_w = x_w.permute(0, 1, 3, 2)
        conv_h, conv_w = self.direction_convs()
        a_h = conv_h(x_h).sigmoid()
        a_w = conv_w(x_w).sigmoid()
        return identity * a_w * a_h


class AuthorsCoordAtt(_AuthorsCoordAttBase):
    """The authors' stand-alone module: `conv_h`, `conv_w`."""

    def __init__(self, inp: int, oup: int, reduction: int = 32):
        super().__init__(inp, reduction)
        self.conv_h = nn.Conv2d(self.conv1.out_channels, oup, kernel_size=1, stride=1, padding=0)
        self.conv_w = nn.Conv2d(self.conv1.out_channels, oup, kernel_size=1, stride=1, padding=0)

    def direction_convs(self):
        return self.conv_h, self.conv_w


class AuthorsCheckpointCoordAtt(_AuthorsCoordAttBase):
    """The same block as named inside the authors' MobileNetV2 checkpoint: `conv2` (h), `conv3` (w)."""

    def __init__(self, inp: int, oup: int, reduction: int = 32):
        super().__init__(inp, reduction)
        self.conv2 = nn.Conv2d(self.conv1.out_channels, oup, kernel_size=1, stride=1, padding=0)
        self.conv3 = nn.Conv2d(self.conv1.out_channels, oup, kernel_size=1, stride=1, padding=0)

    def direction_convs(self):
        return self.conv2, self.conv3
