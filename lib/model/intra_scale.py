"""Intra-scale branch of RMSIN ("various receptive"): a spatial attention map from a
re-parameterizable multi-branch block (RepBlock) applied to the channel mean of a stage.

Names follow the reference (`repblock.brb_3x3.conv1`, ...), so its state_dicts load unchanged.
"""
import torch
from torch import nn

from .fusion import tanh_gate


def _conv_bn(in_ch, out_ch, kernel_size, padding, groups=1):
    block = nn.Sequential()
    block.add_module('conv', nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, groups=groups, bias=False))
    block.add_module('bn', nn.BatchNorm2d(out_ch))
    return block


def _conv1x1_bn_conv_bn(in_ch, out_ch, kernel_size, padding, groups=1):
    """1x1 conv-BN followed by a kxk conv-BN (the diverse-branch 1x1-kxk path)."""
    block = nn.Sequential()
    block.add_module('conv1', nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False))
    block.add_module('bn1', nn.BatchNorm2d(out_ch))
    block.add_module('conv2', nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, groups=groups, bias=False))
    block.add_module('bn2', nn.BatchNorm2d(out_ch))
    return block


class RepBlock(nn.Module):
    """Two multi-branch units (1x1, 1x1->3x3, identity-BN), ReLU between, sigmoid at the end."""

    def __init__(self, in_channels, out_channels, kernel_size=3, groups=1):
        super().__init__()
        if kernel_size != 3:
            raise ValueError('RepBlock supports kernel_size 3 only')
        pad = kernel_size // 2
        same = in_channels == out_channels
        self.brb_3x3 = _conv1x1_bn_conv_bn(in_channels, out_channels, kernel_size, pad, groups)
        self.brb_1x1 = _conv_bn(in_channels, out_channels, 1, 0, groups)
        self.brb_identity = nn.BatchNorm2d(in_channels) if same else None
        self.brb_3x3_2 = _conv1x1_bn_conv_bn(in_channels, out_channels, kernel_size, pad, groups)
        self.brb_1x1_2 = _conv_bn(in_channels, out_channels, 1, 0, groups)
        self.brb_identity_2 = nn.BatchNorm2d(in_channels) if same else None
        self.activation = nn.ReLU()

    @staticmethod
    def _unit(x, b3x3, b1x1, identity):
        out = b1x1(x) + b3x3(x)
        return out + identity(x) if identity is not None else out

    def forward(self, x):
        x = self.activation(self._unit(x, self.brb_3x3, self.brb_1x1, self.brb_identity))
        return torch.sigmoid(self._unit(x, self.brb_3x3_2, self.brb_1x1_2, self.brb_identity_2))


class VariousReceptive(nn.Module):
    """Reweights every pixel of a stage by a map computed from its channel mean.

    x: [B, H*W, C] tokens of an H x W map -> [B, H*W, C]. (The reference infers a square map;
    H and W are passed here so non-square inputs work.)
    """

    def __init__(self, dim):
        super().__init__()
        self.repblock = RepBlock(1, 1)

    def forward(self, x, hw):
        B, _, C = x.shape
        H, W = hw
        feat = x.transpose(1, 2).reshape(B, C, H, W)
        weight = self.repblock(feat.mean(dim=1, keepdim=True))  # [B, 1, H, W]
        return (feat * weight).flatten(2).transpose(1, 2)  # [B, HW, C]


def visual_gate(dim):
    """Gate of the intra-scale residual (same form as the language gate)."""
    return tanh_gate(dim)
