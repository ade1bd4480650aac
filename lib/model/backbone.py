"""Multi-modal Swin Transformer of RMSIN (LAVT encoder + intra-scale branch + cross-scale module).

Each stage: Swin blocks (shifted windows, padded to window multiples) -> two gated residuals on
the stage tokens, language (PWAM) and intra-scale (VariousReceptive) -> patch merging. The stage
output handed to the decoder is the PWAM output (as the reference). The four outputs pass the
cross-scale module `cim` before the decoder.

Parameter names, shapes and registration order equal the reference's (`layers.0.blocks.0.attn.qkv`,
`layers.0.fusion.image_lang_att.f_key`, `norm0`, `cim.block.0.csa1.m.attention.proj`, ...).
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, gen_relative_position_index, trunc_normal_
from timm.models.swin_transformer import window_partition, window_reverse

import utils
from .activation_checkpoint import checkpointed
from .cross_scale import CIM
from .fusion import PWAM, tanh_gate
from .intra_scale import VariousReceptive, visual_gate

# name -> (embed_dim, depths, num_heads)
SWIN_PRESETS = {
    'nano': (32, (2, 2, 2, 2), (1, 2, 4, 8)),  # CPU tests and the demo
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
STRIDE = 32  # total downsampling of the backbone; inputs must be multiples of it


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias table."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.dim = dim
        self.window_size = window_size  # (Wh, Ww)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        # persistent, as in the reference: its state_dicts carry it
        self.register_buffer('relative_position_index', gen_relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _position_bias(self):
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)  # [heads, N, N]

    def forward(self, x, mask=None):
        """x: [nW*B, N, C]; mask: [nW, N, N] (0 / -100) for shifted windows, or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self._position_bias().unsqueeze(0)  # [1, heads, N, N]
        if mask is not None:
            nW = mask.shape[0]
            # windows are batch-major ([B, nW] flattened): fold windows into heads so that one
            # [1, nW*heads, N, N] bias broadcasts over the batch (4-D keeps fused SDPA kernels usable)
            q, k, v = (t.reshape(B_ // nW, nW * self.num_heads, N, -1) for t in (q, k, v))
            bias = (bias + mask.unsqueeze(1)).reshape(1, nW * self.num_heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.)
        out = out.reshape(B_, self.num_heads, N, -1).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4., qkv_bias=True, drop=0.,
                 attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError('shift_size must be in [0, window_size)')
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, (window_size, window_size), num_heads, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x, hw, attn_mask):
        """x: [B, H*W, C]; attn_mask: [nW, ws*ws, ws*ws] for the padded, shifted map."""
        B, L, C = x.shape
        H, W = hw
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = x.shape[1:3]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, (ws, ws)).view(-1, ws * ws, C)  # [nW*B, ws*ws, C]
        windows = self.attn(windows, mask=attn_mask if self.shift_size > 0 else None)
        x = window_reverse(windows.view(-1, ws, ws, C), (ws, ws), Hp, Wp)  # [B, Hp, Wp, C]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm -> Linear(4C -> 2C)."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, hw):
        B, L, C = x.shape
        H, W = hw
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))  # [B, H/2*W/2, 2C]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (conv) + LayerNorm; pads to a patch multiple."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        H, W = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x)  # [B, C, Wh, Ww]
        if self.norm is not None:
            Wh, Ww = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(-1, self.embed_dim, Wh, Ww)
        return x


def shifted_window_mask(H, W, window_size, shift_size, device):
    """Attention mask (0 / -100) that keeps shifted windows from mixing unrelated regions."""
    Hp, Wp = -(-H // window_size) * window_size, -(-W // window_size) * window_size
    img_mask = torch.zeros((1, Hp, Wp, 1), device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, (window_size, window_size)).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)  # [nW, N, N]


class MMBasicLayer(nn.Module):
    """One stage: Swin blocks, then x + g_l(PWAM) * PWAM + g_v(VR) * VR, then patch merging.

    forward(x [B, HW, C], (H, W), l [B, C_text, N], l_mask [B, N, 1]) ->
        (stage output = PWAM output [B, HW, C], (H, W), next-stage tokens, next (H, W)).
    """

    def __init__(self, dim, depth, num_heads, text_dim, window_size=7, mlp_ratio=4., qkv_bias=True, drop=0.,
                 attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, downsample=None, num_heads_fusion=1,
                 fusion_drop=0.0, use_checkpoint=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.dim = dim
        # recompute each Swin block (the reference's `use_checkpoint`), and the language / intra-scale
        # part, in the backward pass instead of keeping their activations; gradients are the same
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, num_heads=num_heads, window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                norm_layer=norm_layer)
            for i in range(depth)])
        # language branch (pixel-word attention) and its gate
        self.fusion = PWAM(dim, dim, text_dim, dim, dim, num_heads=num_heads_fusion, dropout=fusion_drop)
        self.res_gate = tanh_gate(dim)
        # intra-scale branch and its gate
        self.visual_residual = VariousReceptive(dim)
        self.visual_gate = visual_gate(dim)
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None
        if self.downsample is None:
            # The last stage returns the PWAM output and its gated sum feeds nothing (reference
            # behaviour): these weights only exist so reference state_dicts load; they get no
            # gradient, so they are frozen and the unused sum is not computed.
            for m in (self.res_gate, self.visual_residual, self.visual_gate):
                m.requires_grad_(False)

    def forward(self, x, hw, l, l_mask):
        H, W = hw
        attn_mask = shifted_window_mask(H, W, self.window_size, self.shift_size, x.device)
        for blk in self.blocks:
            if self.use_checkpoint:
                x = checkpointed(blk, x, hw, attn_mask)
            else:
                x = blk(x, hw, attn_mask)  # [B, HW, C]
        if self.use_checkpoint:
            x_residual, x_next = checkpointed(self._language_and_merge, x, hw, l, l_mask, modules=[self])
        else:
            x_residual, x_next = self._language_and_merge(x, hw, l, l_mask)
        if self.downsample is None:
            return x_residual, hw, x, hw
        return x_residual, hw, x_next, ((H + 1) // 2, (W + 1) // 2)

    def _language_and_merge(self, x, hw, l, l_mask):
        x_residual = self.fusion(x, l, l_mask)  # [B, HW, C]
        if self.downsample is None:
            return x_residual, x
        v_residual = self.visual_residual(x, hw)
        x = x + self.res_gate(x_residual) * x_residual + self.visual_gate(v_residual) * v_residual
        return x_residual, self.downsample(x, hw)


def _init_weights(m):
    # the reference's backbone init: truncated-normal Linear weights, zero biases, unit LayerNorms
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class MultiModalSwinTransformer(nn.Module):
    """forward(image [B, 3, H, W], l [B, text_dim, N], l_mask [B, N, 1]) -> 4 maps [B, C_i, H/4/2^i, W/4/2^i].

    H and W must be multiples of 32. `img_size` only sets the grid the faithful cross-scale module
    is built for (its token mixer has a size-dependent shape; 480 gives the reference's).
    """

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), text_dim=768, window_size=7,
                 img_size=480, patch_size=4, in_chans=3, mlp_ratio=4., qkv_bias=True, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0.2, norm_layer=nn.LayerNorm, patch_norm=True,
                 out_indices=(0, 1, 2, 3), num_heads_fusion=(1, 1, 1, 1), fusion_drop=0.0,
                 cross_scale='faithful', use_checkpoint=False):
        super().__init__()
        if img_size % STRIDE:
            raise utils.InputError(f'--img_size {img_size} is not a multiple of {STRIDE}')
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.text_dim = text_dim
        self.out_indices = tuple(out_indices)
        self.cross_scale = cross_scale
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu')]  # stochastic depth
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(MMBasicLayer(
                dim=embed_dim * 2 ** i, depth=depths[i], num_heads=num_heads[i], text_dim=text_dim,
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer, downsample=PatchMerging if i < self.num_layers - 1 else None,
                num_heads_fusion=num_heads_fusion[i], fusion_drop=fusion_drop, use_checkpoint=use_checkpoint))
        self.num_features = [embed_dim * 2 ** i for i in range(self.num_layers)]
        for i in self.out_indices:
            self.add_module(f'norm{i}', norm_layer(self.num_features[i]))
        if cross_scale == 'faithful':
            self.cim = CIM(self.num_features, grid=(img_size // STRIDE, img_size // STRIDE))
        elif cross_scale == 'msda':
            from .cross_scale_msda import MSDACrossScale  # optional module, built by the ops issue
            self.cim = MSDACrossScale(self.num_features)
        else:
            raise utils.InputError(f"--cross_scale must be 'faithful' or 'msda', got {cross_scale!r}")

    def init_weights(self):
        """Random init as the reference (before any pretrained Swin weights are loaded)."""
        for name, child in self.named_children():
            if name == 'cim' and self.cross_scale != 'faithful':
                continue  # the deformable module keeps its own (sampling-grid) initialisation
            child.apply(_init_weights)

    def check_inputs(self, x, l, l_mask):
        if x.dim() != 4:
            raise utils.InputError(f'image must be [B, 3, H, W], got shape {tuple(x.shape)}')
        H, W = x.shape[-2:]
        if H % STRIDE or W % STRIDE:
            raise utils.InputError(f'image size {H}x{W} is not a multiple of {STRIDE} (set --img_size to one)')
        if l.dim() != 3 or l.shape[1] != self.text_dim:
            raise utils.InputError(f'text features must be [B, {self.text_dim}, N] (the model was built for '
                                   f'text width {self.text_dim}), got shape {tuple(l.shape)}')
        if l_mask.shape != (l.shape[0], l.shape[2], 1):
            raise utils.InputError(f'text mask must be [B, N, 1] = {(l.shape[0], l.shape[2], 1)}, '
                                   f'got {tuple(l_mask.shape)}')

    def forward(self, x, l, l_mask):
        self.check_inputs(x, l, l_mask)
        l_mask = l_mask.to(l.dtype)
        x = self.patch_embed(x)  # [B, C, Wh, Ww]
        hw = tuple(x.shape[-2:])
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, Wh*Ww, C]
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, (H, W), x, hw = layer(x, hw, l, l_mask)
            if i in self.out_indices:
                x_out = getattr(self, f'norm{i}')(x_out)
                outs.append(x_out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        if self.use_checkpoint:
            return tuple(checkpointed(self.cim, outs, modules=[self.cim]))
        return tuple(self.cim(outs))
