"""Language fusion of one Swin stage: PWAM (pixel-word attention) and the tanh gates.

Parameter names and shapes follow the reference (LAVT / RMSIN) so that its state_dicts load
unchanged; the text width is a constructor argument instead of a hard-coded 768.
"""
import torch.nn.functional as F
from torch import nn


def tanh_gate(dim):
    """Per-channel gate of a residual branch: Linear-ReLU-Linear-Tanh (keys `0.weight`, `2.weight`)."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.ReLU(),
        nn.Linear(dim, dim, bias=False),
        nn.Tanh(),
    )


class SpatialImageLanguageAttention(nn.Module):
    """Every pixel attends over the words of its sentence; padded words are masked out.

    x: [B, HW, v_in], l: [B, l_in, N_l], l_mask: [B, N_l, 1] (1 = word, 0 = padding) -> [B, HW, out].
    """

    def __init__(self, v_in_channels, l_in_channels, key_channels, value_channels, out_channels=None,
                 num_heads=1):
        super().__init__()
        out_channels = out_channels or value_channels
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f'PWAM heads ({num_heads}) must divide the stage width ({key_channels})')
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        # no normalisation on the language side: sentences are mostly zero padding
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, kernel_size=1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in_channels, key_channels, kernel_size=1),
                                     nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, kernel_size=1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, kernel_size=1),
                               nn.InstanceNorm1d(out_channels))

    def forward(self, x, l, l_mask):
        B, HW = x.shape[:2]
        heads = self.num_heads
        l_mask = l_mask.transpose(1, 2)  # [B, 1, N_l]
        query = self.f_query(x.transpose(1, 2))  # [B, key, HW]
        key = self.f_key(l) * l_mask  # [B, key, N_l]
        value = self.f_value(l) * l_mask  # [B, value, N_l]
        n_l = value.shape[-1]
        query = query.reshape(B, heads, self.key_channels // heads, HW).transpose(2, 3)  # [B, h, HW, dk]
        key = key.reshape(B, heads, self.key_channels // heads, n_l)  # [B, h, dk, N_l]
        value = value.reshape(B, heads, self.value_channels // heads, n_l)  # [B, h, dv, N_l]

        # the reference scales by the full key width (not per head) and masks with -1e4
        sim = (self.key_channels ** -.5) * (query @ key)  # [B, h, HW, N_l]
        sim = sim + (1e4 * l_mask.unsqueeze(1) - 1e4)
        sim = F.softmax(sim, dim=-1)
        out = sim @ value.transpose(2, 3)  # [B, h, HW, dv]
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)
        out = self.W(out.transpose(1, 2))  # [B, out, HW]
        return out.transpose(1, 2)  # [B, HW, out]


class PWAM(nn.Module):
    """Pixel-Word Attention Module: visual projection * language context, then a 1x1 projection.

    x: [B, HW, dim], l: [B, l_in, N_l], l_mask: [B, N_l, 1] -> [B, HW, value_channels].
    """

    def __init__(self, dim, v_in_channels, l_in_channels, key_channels, value_channels, num_heads=1,
                 dropout=0.0):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels, l_in_channels, key_channels, value_channels, out_channels=value_channels,
            num_heads=num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1), nn.GELU(),
                                        nn.Dropout(dropout))

    def forward(self, x, l, l_mask):
        vis = self.vis_project(x.transpose(1, 2))  # [B, dim, HW]
        lang = self.image_lang_att(x, l, l_mask).transpose(1, 2)  # [B, dim, HW]
        mm = self.project_mm(vis * lang)  # [B, dim, HW]
        return mm.transpose(1, 2)  # [B, HW, dim]
