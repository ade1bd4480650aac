"""Top-down decoder of RMSIN (SimpleDecoding) with adaptive rotated convolutions (ARC).

An ARC layer predicts, per sample, an angle and a gate from its input (RoutingFunction), rotates
its 3x3 kernel by that angle (bilinear resampling of the 9 taps, written as a 9x9 matrix) and
convolves each sample with its own kernel: one grouped convolution for the whole batch.
Names follow the reference (`conv2_4.weight`, `conv2_4.rounting_func.fc_theta`, ...).
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from .activation_checkpoint import checkpointed

# Rotation of a 3x3 kernel by theta as a 9x9 matrix acting on the raster-ordered taps, with
# x = cos, y = sin, a = x - y, b = x * y, c = x + y. Entries: (row, col, term); zero elsewhere.
_ROT_POSITIVE = (  # theta >= 0
    (0, 0, 'a'), (0, 1, '1-a'),
    (1, 1, 'x-b'), (1, 2, 'b'), (1, 4, '1-c+b'), (1, 5, 'y-b'),
    (2, 2, 'a'), (2, 5, '1-a'),
    (3, 0, 'b'), (3, 1, 'y-b'), (3, 3, 'x-b'), (3, 4, '1-c+b'),
    (4, 4, '1'),
    (5, 4, '1-c+b'), (5, 5, 'x-b'), (5, 7, 'y-b'), (5, 8, 'b'),
    (6, 3, '1-a'), (6, 6, 'a'),
    (7, 3, 'y-b'), (7, 4, '1-c+b'), (7, 6, 'b'), (7, 7, 'x-b'),
    (8, 7, '1-a'), (8, 8, 'a'),
)
_ROT_NEGATIVE = (  # theta < 0
    (0, 0, 'c'), (0, 3, '1-c'),
    (1, 0, '-b'), (1, 1, 'x+b'), (1, 3, 'b-y'), (1, 4, '1-a-b'),
    (2, 1, '1-c'), (2, 2, 'c'),
    (3, 3, 'x+b'), (3, 4, '1-a-b'), (3, 6, '-b'), (3, 7, 'b-y'),
    (4, 4, '1'),
    (5, 1, 'b-y'), (5, 2, '-b'), (5, 4, '1-a-b'), (5, 5, 'x+b'),
    (6, 6, 'c'), (6, 7, '1-c'),
    (7, 4, '1-a-b'), (7, 5, 'b-y'), (7, 7, 'x+b'), (7, 8, '-b'),
    (8, 5, '1-c'), (8, 8, 'c'),
)


def _rotation_terms(thetas):
    x, y = torch.cos(thetas), torch.sin(thetas)
    a, b, c = x - y, x * y, x + y
    return {'1': torch.ones_like(x), 'a': a, '1-a': 1 - a, 'b': b, '-b': -b, 'c': c, '1-c': 1 - c,
            'x-b': x - b, 'y-b': y - b, '1-c+b': 1 - c + b, 'x+b': x + b, 'b-y': b - y, '1-a-b': 1 - a - b}


def _flat_index(table, device):
    return torch.tensor([r * 9 + c for r, c, _ in table], device=device)


# cached in eager mode: building it on a GPU is a blocking host-to-device copy on every call; a compiled
# graph holds it as a constant instead
_cached_flat_index = functools.lru_cache(maxsize=None)(_flat_index)


def _fill(table, terms, shape):
    flat = torch.zeros(*shape, 81, dtype=terms['1'].dtype, device=terms['1'].device)
    values = torch.stack([terms[t] for _, _, t in table], dim=-1)
    index = (_flat_index if torch.compiler.is_compiling() else _cached_flat_index)(table, flat.device)
    return flat.index_copy(-1, index, values).unflatten(-1, (9, 9))


def rotation_matrix_3x3(thetas):
    """thetas [B, n] (radians) -> [B, n, 9, 9] bilinear rotation of raster-ordered 3x3 taps."""
    terms = _rotation_terms(thetas)
    positive = _fill(_ROT_POSITIVE, terms, thetas.shape)
    negative = _fill(_ROT_NEGATIVE, terms, thetas.shape)
    return torch.where((thetas >= 0)[..., None, None], positive, negative)


def rotate_kernels(weight, lambdas, thetas):
    """Per-sample gated sum of rotated kernels.

    weight [n, Cout, Cin, 3, 3], lambdas/thetas [B, n] -> [B * Cout, Cin, 3, 3].
    """
    n, c_out, c_in, k, _ = weight.shape
    if k != 3:
        raise ValueError(f'adaptive rotated conv supports 3x3 kernels only, got {k}x{k}')
    rot = rotation_matrix_3x3(thetas) * lambdas[..., None, None]  # [B, n, 9, 9]
    taps = weight.reshape(n, c_out * c_in, 9)  # [n, Cout*Cin, 9]
    out = torch.einsum('bnij,nkj->bki', rot, taps)  # [B, Cout*Cin, 9]
    return out.reshape(-1, c_in, k, k)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a [B, C, H, W] map (key `norm.*` as the reference proxy)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RoutingFunction(nn.Module):
    """Predicts per-sample kernel gates (sigmoid) and angles (softsign * 40 degrees)."""

    def __init__(self, in_channels, kernel_number, dropout_rate=0.2, proportion=40.0):
        super().__init__()
        self.kernel_number = kernel_number
        self.dwc = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=False)
        self.norm = LayerNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.fc_alpha = nn.Linear(in_channels, kernel_number, bias=True)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.fc_theta = nn.Linear(in_channels, kernel_number, bias=False)
        self.act_func = nn.Softsign()
        self.proportion = proportion / 180.0 * math.pi
        trunc_normal_(self.dwc.weight, std=.02)
        trunc_normal_(self.fc_alpha.weight, std=.02)
        trunc_normal_(self.fc_theta.weight, std=.02)

    def forward(self, x):
        x = self.relu(self.norm(self.dwc(x))).mean(dim=(2, 3))  # [B, C]
        alphas = torch.sigmoid(self.fc_alpha(self.dropout1(x)))  # [B, n]
        angles = self.act_func(self.fc_theta(self.dropout2(x))) * self.proportion  # [B, n]
        return alphas, angles


class AdaptiveRotatedConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=1, dilation=1, groups=1,
                 bias=False, kernel_number=1, rounting_func=None):
        super().__init__()
        if bias:
            raise ValueError('AdaptiveRotatedConv2d has no bias (as the reference)')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups, self.kernel_number = dilation, groups, kernel_number
        self.rounting_func = rounting_func  # (sic) the reference's attribute name, kept for its state_dicts
        self.channels_last = False  # set by SimpleDecoding(channels_last=True)
        self.weight = nn.Parameter(torch.empty(kernel_number, out_channels, in_channels // groups,
                                               kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        B, _, H, W = x.shape
        alphas, angles = self.rounting_func(x)
        weight = rotate_kernels(self.weight, alphas, angles)  # [B*Cout, Cin/groups, 3, 3]
        if self.channels_last:
            # NHWC: one dense convolution per sample (the layout's fast kernels), no batch folding, which
            # would need NCHW copies
            weight = weight.contiguous(memory_format=torch.channels_last)
            return torch.cat([F.conv2d(x[b:b + 1], weight[b * self.out_channels:(b + 1) * self.out_channels],
                                       stride=self.stride, padding=self.padding, dilation=self.dilation,
                                       groups=self.groups) for b in range(B)])
        # every sample convolved with its own kernel: fold the batch into the channel groups
        out = F.conv2d(x.reshape(1, -1, H, W), weight, stride=self.stride, padding=self.padding,
                       dilation=self.dilation, groups=self.groups * B)
        return out.reshape(B, self.out_channels, *out.shape[2:])

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_number={self.kernel_number}, '
                f'kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}')


class SimpleDecoding(nn.Module):
    """Fuses the four stage maps top-down (c4+c3 -> +c2 -> +c1) and predicts 2-class logits at 1/4.

    channels_last: keep the maps and the 4-D convolution weights in channels-last (NHWC) memory, the
    layout tensor-core convolutions run in; values are the same up to the kernels' rounding.
    """

    def __init__(self, c4_dims, factor=2, channels_last=False, checkpoint_activations=False):
        super().__init__()
        self.channels_last = channels_last
        self.checkpoint_activations = checkpoint_activations
        hidden = c4_dims // factor
        c3_size, c2_size, c1_size = c4_dims // factor, c4_dims // factor ** 2, c4_dims // factor ** 3
        for name, in_ch in (('4', c4_dims + c3_size), ('3', hidden + c2_size), ('2', hidden + c1_size)):
            # registration order as the reference, so parameter order (optimizer states) matches too
            self.add_module(f'conv1_{name}', nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False))
            self.add_module(f'conv2_{name}', AdaptiveRotatedConv2d(
                hidden, hidden, kernel_size=3, padding=1, bias=False, kernel_number=1,
                rounting_func=RoutingFunction(hidden, kernel_number=1)))
            self.add_module(f'bn1_{name}', nn.BatchNorm2d(hidden))
            self.add_module(f'relu1_{name}', nn.ReLU())
            self.add_module(f'bn2_{name}', nn.BatchNorm2d(hidden))
            self.add_module(f'relu2_{name}', nn.ReLU())
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)
        if channels_last:  # 4-D weights only (the rotated convs' 5-D kernel bank is resampled per sample)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.to(memory_format=torch.channels_last)
                elif isinstance(m, AdaptiveRotatedConv2d):
                    m.channels_last = True

    def _fuse(self, name, x, skip):
        if x.shape[-2] < skip.shape[-2] or x.shape[-1] < skip.shape[-1]:
            x = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)
        x = torch.cat([x, skip], dim=1)
        x = getattr(self, f'relu1_{name}')(getattr(self, f'bn1_{name}')(getattr(self, f'conv1_{name}')(x)))
        return getattr(self, f'relu2_{name}')(getattr(self, f'bn2_{name}')(getattr(self, f'conv2_{name}')(x)))

    def forward(self, x_c4, x_c3, x_c2, x_c1):
        if self.channels_last:
            x_c4, x_c3, x_c2, x_c1 = (t.contiguous(memory_format=torch.channels_last) for t in (x_c4, x_c3, x_c2, x_c1))
        x = x_c4
        for name, skip in (('4', x_c3), ('3', x_c2), ('2', x_c1)):
            if self.checkpoint_activations:  # recomputed in the backward pass (--checkpoint_activations)
                x = checkpointed(self._fuse, name, x, skip, modules=[self])
            else:
                x = self._fuse(name, x, skip)
        return self.conv1_1(x)  # [B, 2, H/4, W/4]
