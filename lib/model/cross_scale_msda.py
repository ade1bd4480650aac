"""Deformable cross-scale interaction (`--cross_scale msda`): an alternative to RMSIN's cross-scale module.

The four Swin stage outputs are projected to one width, flattened into a single token sequence and passed
through a few Deformable-DETR encoder layers (every token attends to sampled points of all four levels);
each level is then projected back to its width and added to its input, so stage shapes are unchanged.
"""
import math

import torch
from timm.layers import Mlp
from torch import nn

from ops import MSDeformAttn


def sine_position_encoding(height, width, dim, device=None, dtype=torch.float32, temperature=10000.0):
    """DETR's normalized 2-D sine encoding of an H x W grid -> [H*W, dim] (first half y, second half x)."""
    if dim % 4 != 0:
        raise ValueError(f'sine_position_encoding: dim must be divisible by 4, got {dim}')
    scale = 2 * math.pi
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * scale
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * scale
    half = dim // 2
    freqs = temperature ** (2 * (torch.arange(half, device=device, dtype=torch.float32) // 2) / half)

    def encode(coords):                                   # [K] -> [K, half], interleaved sin / cos
        angles = coords[:, None] / freqs
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat([pos_y, pos_x], -1).reshape(height * width, dim).to(dtype)  # [HW, dim]


def pixel_center_reference_points(spatial_shapes, n_levels, device=None, dtype=torch.float32):
    """Normalized (x, y) of every pixel centre of every level, repeated for each level -> [S, L, 2]."""
    points = []
    for height, width in spatial_shapes:
        ys, xs = torch.meshgrid((torch.arange(height, device=device, dtype=dtype) + 0.5) / height,
                                (torch.arange(width, device=device, dtype=dtype) + 0.5) / width, indexing='ij')
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))   # [HW, 2]
    return torch.cat(points, 0)[:, None, :].expand(-1, n_levels, -1)       # [S, L, 2]


class DeformableEncoderLayer(nn.Module):
    """Post-norm Deformable-DETR encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, d_model=256, d_ffn=1024, n_levels=4, n_heads=8, n_points=4, dropout=0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = Mlp(d_model, d_ffn, act_layer=nn.ReLU, drop=dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        # src, pos: [B, S, C]; reference_points: [B, S, L, 2]
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.ffn(src))


class MSDACrossScale(nn.Module):
    """Cross-scale interaction of the four stage outputs with deformable attention.

    Args:
        channels: widths of the stage outputs, e.g. [128, 256, 512, 1024] for Swin-B.
        d_model: width of the shared token space.
        num_layers: deformable encoder layers (2 keeps it cheap at 480 px: 19,125 tokens).
        n_heads, n_points: deformable attention heads and sampling points per head and level.
        d_ffn: FFN hidden width (default 4 * d_model).
        dropout: dropout inside the encoder layers.
        layer_scale_init: initial per-channel scale of each level's update. Small, so the pretrained
            backbone features dominate at the start; not zero, so every parameter gets a gradient from
            the first step (a zero-initialised output would leave the encoder without gradient).
    forward(list of 4 tensors [B, C_i, H_i, W_i]) -> list of 4 tensors of the same shapes.
    """

    def __init__(self, channels, d_model=256, num_layers=2, n_heads=8, n_points=4, d_ffn=None, dropout=0.0,
                 layer_scale_init=0.1):
        super().__init__()
        self.channels = list(channels)
        self.d_model = d_model
        n_levels = len(self.channels)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(math.gcd(32, d_model), d_model))
            for c in self.channels)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, d_ffn or 4 * d_model, n_levels, n_heads, n_points, dropout)
            for _ in range(num_layers))
        self.output_proj = nn.ModuleList(nn.Conv2d(d_model, c, kernel_size=1) for c in self.channels)
        self.output_scale = nn.ParameterList(nn.Parameter(torch.full((c,), float(layer_scale_init)))
                                             for c in self.channels)
        self._reset_parameters()

    def _reset_parameters(self):
        for proj in list(self.input_proj) + list(self.output_proj):
            conv = proj[0] if isinstance(proj, nn.Sequential) else proj
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, features):
        if len(features) != len(self.channels):
            raise ValueError(f'MSDACrossScale: expected {len(self.channels)} feature maps, got {len(features)}')
        for level, (x, c) in enumerate(zip(features, self.channels)):
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f'MSDACrossScale: level {level} must be [B, {c}, H, W], got {tuple(x.shape)}')
        B = features[0].shape[0]
        device = features[0].device
        shapes = [tuple(x.shape[-2:]) for x in features]

        tokens, pos = [], []
        for level, (x, proj) in enumerate(zip(features, self.input_proj)):
            tokens.append(proj(x).flatten(2).transpose(1, 2))                              # [B, HW, C]
            pos.append(sine_position_encoding(*shapes[level], self.d_model, device) + self.level_embed[level])
        src = torch.cat(tokens, 1)                                                           # [B, S, C]
        pos = torch.cat(pos, 0)[None].to(src.dtype)                                          # [1, S, C]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)            # [L, 2]
        sizes = [h * w for h, w in shapes]
        level_start_index = torch.as_tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long,
                                            device=device)
        reference_points = pixel_center_reference_points(shapes, len(shapes), device)[None].expand(B, -1, -1, -1)

        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)

        outputs = []
        for level, (x, chunk) in enumerate(zip(features, src.split(sizes, 1))):
            update = chunk.transpose(1, 2).reshape(B, self.d_model, *shapes[level])          # [B, C, H, W]
            update = self.output_proj[level](update) * self.output_scale[level].view(1, -1, 1, 1)
            outputs.append(x + update.to(x.dtype))
        return outputs
