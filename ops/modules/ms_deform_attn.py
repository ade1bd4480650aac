"""Multi-scale deformable attention module (Deformable-DETR's MSDeformAttn: same parameter names, shapes
and initialisation, so its checkpoints load unchanged)."""
import math

import torch
from torch import nn

from ..functions import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled locations per head and level around its reference point.

    Args:
        d_model: hidden width (split over n_heads).
        n_levels: feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        im2col_step: batch items per CUDA kernel launch (Deformable-DETR's argument).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, im2col_step=64):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f'MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})')
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.im2col_step = im2col_step

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start as rays in n_heads directions, point i at distance i + 1 (in pixels of each level);
        # zero weights make the offsets and the attention (uniform) independent of the query at first.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)                       # [M, 2]
        directions = directions / directions.abs().max(-1, keepdim=True)[0]             # onto the unit square
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        """
        query:                   [N, Lq, C]
        reference_points:        [N, Lq, L, 2] (x, y) in [0, 1], or [N, Lq, L, 4] boxes (cx, cy, w, h)
        input_flatten:           [N, S, C], levels flattened in order
        input_spatial_shapes:    [L, 2] int64 (H, W)
        input_level_start_index: [L] int64
        input_padding_mask:      [N, S] bool, True at padding (those values are zeroed), or None
        returns                  [N, Lq, C]
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if reference_points.dim() != 4 or reference_points.shape[:3] != (N, Lq, L) \
                or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f'MSDeformAttn: reference_points must be [N, Lq, L, 2|4] = [{N}, {Lq}, {L}, 2|4], '
                             f'got {tuple(reference_points.shape)}')

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)                                 # [N, S, M, D]
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalize by (W, H)
            shapes = torch.as_tensor(input_spatial_shapes, device=offsets.device)
            normalizer = shapes.flip(-1).to(reference_points.dtype)                       # [L, 2] (W, H)
            locations = reference_points[:, :, None, :, None, :] \
                + offsets / normalizer[None, None, None, :, None, :]
        else:
            # offsets are relative to the box size
            locations = reference_points[:, :, None, :, None, :2] \
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5         # [N, Lq, M, L, P, 2]
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                                self.im2col_step)                                         # [N, Lq, C]
        return self.output_proj(output)
