"""Cross-scale interaction module (CIM) of RMSIN, generalised from Swin-B at 480 px.

The four stage outputs are average-pooled to the 1/32 grid, concatenated along channels,
reduced to a quarter of the width, passed through attention over the grid tokens plus two
strided depth-wise poolings of them, and fed back to every stage through a scale-aware gate.

What the reference hard-codes and how it is derived here:
- stage widths [128, 256, 512, 1024] -> `channels` (the backbone's stage widths);
- the 15 x 15 grid (480 / 32)       -> the run-time shape of the last stage;
- `img_shape=225, att_shape=314`    -> h*w and h*w + h1*w1 + h2*w2, where (h1, w1), (h2, w2) are the
  outputs of the stride-2 (k3, p1) and stride-3 (k5, p2) depth-wise convs: 15 -> 8 and 15 -> 5,
  so 225 + 64 + 25 = 314.
The only size-dependent parameter is the token mixer `attention.proj` (Linear(att_tokens ->
img_tokens)). It is built for `grid` (the 1/32 grid of --img_size; 15 x 15 gives the reference
shapes). At another grid its weight is resampled on the fly (`resize_token_proj`): an
approximation, exact at the built size; train with --img_size set to the size you use.
"""
import torch
import torch.nn.functional as F
from torch import nn


def pooled_grid(h, w):
    """Grids after the stride-2 and stride-3 depth-wise convs of CrossScaleAttention."""
    return ((h - 1) // 2 + 1, (w - 1) // 2 + 1), ((h - 1) // 3 + 1, (w - 1) // 3 + 1)


def token_counts(h, w):
    """(img_tokens, att_tokens) of the token mixer for an h x w grid; (225, 314) at 15 x 15."""
    (h1, w1), (h2, w2) = pooled_grid(h, w)
    return h * w, h * w + h1 * w1 + h2 * w2


def resize_token_proj(weight, bias, src_grid, dst_grid):
    """Resample the token mixer Linear(att_tokens -> h*w) built for `src_grid` to `dst_grid`.

    Output rows are raster positions of the h x w grid: resampled bilinearly in 2-D. The input
    axis mixes tokens and channels (the reference reshapes [N, heads*d] memory as [heads*d, N]),
    so it has no spatial layout: resampled linearly in 1-D and rescaled by the count ratio so a
    constant input keeps its response.
    """
    (sh, sw), (dh, dw) = src_grid, dst_grid
    _, src_in = token_counts(sh, sw)
    _, dst_in = token_counts(dh, dw)
    w = weight.reshape(1, sh, sw, src_in).permute(0, 3, 1, 2)  # [1, in, sh, sw]
    w = F.interpolate(w, size=(dh, dw), mode='bilinear', align_corners=False)
    w = w.flatten(2).transpose(1, 2)  # [1, dh*dw, in]
    w = F.interpolate(w, size=dst_in, mode='linear', align_corners=False)[0] * (src_in / dst_in)
    b = F.interpolate(bias.reshape(1, 1, sh, sw), size=(dh, dw), mode='bilinear', align_corners=False)
    return w, b.flatten()


class Residual(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class LinearBN(nn.Sequential):
    """Bias-free Linear followed by BatchNorm over all tokens (keys `c.weight`, `bn.*`)."""

    def __init__(self, in_features, out_features, bn_weight_init=1.0):
        super().__init__()
        self.add_module('c', nn.Linear(in_features, out_features, bias=False))
        self.add_module('bn', nn.BatchNorm1d(out_features))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x):  # [B, N, C]
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ScaleAwareGate(nn.Module):
    """Fuses a stage map (local) with the cross-scale map (global, upsampled) by a hard-sigmoid gate."""

    def __init__(self, inp, oup):
        super().__init__()
        self.local_embedding = nn.Conv2d(inp, oup, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(oup)
        self.global_embedding = nn.Conv2d(inp, oup, kernel_size=1)
        self.bn2 = nn.BatchNorm2d(oup)
        self.global_act = nn.Conv2d(inp, oup, kernel_size=1)
        self.bn3 = nn.BatchNorm2d(oup)
        self.act = nn.Hardsigmoid()  # relu6(x + 3) / 6, as the reference's h_sigmoid

    def forward(self, x_l, x_g):
        size = x_l.shape[-2:]
        local_feat = self.bn1(self.local_embedding(x_l))
        global_feat = F.interpolate(self.bn2(self.global_embedding(x_g)), size=size, mode='bilinear',
                                    align_corners=False)
        gate = F.interpolate(self.act(self.bn3(self.global_act(x_g))), size=size, mode='bilinear',
                             align_corners=False)
        return local_feat * gate + global_feat


class TokenAttention(nn.Module):
    """Attention over grid tokens + pooled tokens, with a depth-wise conv path on the values.

    x: [B, N, C] (N = h*w grid tokens followed by the pooled ones), grid (h, w) -> [B, h*w, C].
    """

    def __init__(self, dim, grid, key_dim=32, num_heads=8, attn_ratio=2):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.grid = tuple(grid)
        img_tokens, att_tokens = token_counts(*self.grid)
        self.qkv = LinearBN(dim, self.dh + 2 * key_dim * num_heads)
        self.parallel_conv = nn.Sequential(
            nn.Hardswish(),
            nn.Conv2d(self.dh, self.dh, kernel_size=3, padding=1, groups=self.dh),
        )
        self.to_out = nn.Linear(self.dh, dim)
        self.proj = nn.Linear(att_tokens, img_tokens)

    def _proj(self, x, grid):
        if grid == self.grid:
            return self.proj(x)
        weight, bias = resize_token_proj(self.proj.weight, self.proj.bias, self.grid, grid)
        return F.linear(x, weight, bias)

    def forward(self, x, grid):
        B, N, _ = x.shape
        h, w = grid
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, N, *]
        # the reference reinterprets [heads, h*w, d] memory as [dh, h, w]; kept for weight compatibility
        v_conv = self.parallel_conv(v[:, :, :h * w].reshape(B, self.dh, h, w)).flatten(2)  # [B, dh, hw]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, N, d]
        out = out.transpose(1, 2).reshape(B, self.dh, N)  # same memory reinterpretation as the reference
        out = self._proj(out, (h, w)) + v_conv  # [B, dh, hw]
        return self.to_out(out.transpose(1, 2))  # [B, hw, dim]


class CrossScaleAttention(nn.Module):
    def __init__(self, dim, grid):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(dim)
        self.DWConv1 = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, groups=dim),
            nn.BatchNorm2d(dim),
        )
        self.DWConv2 = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=5, stride=3, padding=2, groups=dim),
            nn.BatchNorm2d(dim),
        )
        self.attention = TokenAttention(dim, grid)
        self.bn4 = nn.BatchNorm2d(dim)
        self.activate = nn.Hardswish()
        self.conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x):  # [B, C, h, w]
        B, C, h, w = x.shape
        x0 = self.bn1(x)
        tokens = torch.cat([x0.flatten(2), self.DWConv1(x0).flatten(2), self.DWConv2(x0).flatten(2)], dim=2)
        out = self.attention(tokens.transpose(1, 2), (h, w))  # [B, hw, C]
        out = out.transpose(1, 2).reshape(B, C, h, w)
        return self.conv(self.activate(self.bn4(out)))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=dim)
        self.relu = nn.ReLU6()
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        return self.conv3(self.relu(self.conv2(self.bn2(self.conv1(self.bn1(x))))))


class IntraFeedForward(nn.Module):
    """A separate residual feed-forward per stage's slice of the reduced channels (`ff1`..`ffN`)."""

    def __init__(self, channels, mlp_ratio=2):
        super().__init__()
        self.channels = [c // 4 for c in channels]
        for i, c in enumerate(self.channels):
            self.add_module(f'ff{i + 1}', Residual(FeedForward(c, mlp_ratio * c)))

    def forward(self, x):
        parts = x.split(self.channels, dim=1)
        return torch.cat([getattr(self, f'ff{i + 1}')(p) for i, p in enumerate(parts)], dim=1)


class CIMBlock(nn.Module):
    def __init__(self, dim, channels, grid, mlp_ratio=2):
        super().__init__()
        self.csa1 = Residual(CrossScaleAttention(dim, grid))
        self.intra_ff = Residual(IntraFeedForward(channels, mlp_ratio))
        self.csa2 = Residual(CrossScaleAttention(dim, grid))
        self.ff = Residual(FeedForward(dim, dim * mlp_ratio))

    def forward(self, x):
        return self.ff(self.csa2(self.intra_ff(self.csa1(x))))


class CIM(nn.Module):
    """Cross-scale interaction over the stage outputs.

    channels: stage widths, e.g. [128, 256, 512, 1024] (each divisible by 4);
    grid: (h, w) of the last stage at the training size, (15, 15) for 480 px.
    forward(list of [B, C_i, H_i, W_i]) -> list of the same shapes.
    """

    def __init__(self, channels, grid=(15, 15), num_layers=1):
        super().__init__()
        if any(c % 4 for c in channels):
            raise ValueError(f'CIM needs stage widths divisible by 4, got {list(channels)}')
        dim = sum(channels)
        self.hidden_dim = dim // 4
        self.channels = list(channels)
        self.down_channel = nn.Conv2d(dim, self.hidden_dim, 1)
        self.up_channel = nn.Conv2d(self.hidden_dim, dim, 1)
        self.block = nn.ModuleList([CIMBlock(self.hidden_dim, self.channels, grid) for _ in range(num_layers)])
        self.bn = nn.BatchNorm2d(self.hidden_dim)
        self.fusion = nn.ModuleList([ScaleAwareGate(c, c) for c in self.channels])

    def forward(self, feats):
        size = feats[-1].shape[-2:]
        out = torch.cat([F.adaptive_avg_pool2d(f, size) for f in feats], dim=1)  # [B, sum C, h, w]
        out = self.down_channel(out)
        for layer in self.block:
            out = layer(out)
        out = self.up_channel(self.bn(out))
        return [gate(f, g) for gate, f, g in zip(self.fusion, feats, out.split(self.channels, dim=1))]
