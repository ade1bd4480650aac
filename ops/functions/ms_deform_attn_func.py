"""Multi-scale deformable attention: input checks, the PyTorch implementation, the CUDA autograd Function
and the dispatcher between them.

Layout (Deformable-DETR / Mask2Former / mmcv):
    value               [N, S, M, D]         S = sum_l H_l * W_l, levels flattened row-major in order
    spatial_shapes      [L, 2] int64         (H_l, W_l)
    level_start_index   [L] int64            start of level l in S
    sampling_locations  [N, Lq, M, L, P, 2]  (x, y) in [0, 1]; pixel = x * W - 0.5 (align_corners=False)
    attention_weights   [N, Lq, M, L, P]
    output              [N, Lq, M * D]
Samples outside a level read zeros (bilinear, zero padding).

Dtypes: value, locations and weights are promoted to one floating dtype (e.g. bf16 value with fp32
locations under autocast runs in fp32, so locations never lose precision). The CUDA kernel handles
float, double, half and bfloat16 natively (float arithmetic, float gradient accumulation); the PyTorch
path runs half/bfloat16 on CPU in float32 and casts back.
"""
import os

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .extension import get_extension

BACKENDS = ('auto', 'cuda', 'pytorch')
FORCE_PYTORCH_ENV = 'LRB_MSDA_FORCE_PYTORCH'


def _shape_list(spatial_shapes):
    """[(H, W), ...] from a [L, 2] tensor or a sequence of pairs."""
    if torch.is_tensor(spatial_shapes):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 im2col_step=64):
    """Raises ValueError naming the inconsistent argument; returns the level sizes [(H, W), ...]."""
    for name, t in (('value', value), ('sampling_locations', sampling_locations),
                    ('attention_weights', attention_weights)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f'ms_deform_attn: {name} must be a floating-point tensor')
    if value.dim() != 4:
        raise ValueError(f'ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}')
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError('ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], '
                         f'got shape {tuple(sampling_locations.shape)}')
    if attention_weights.dim() != 5:
        raise ValueError('ms_deform_attn: attention_weights must be [N, Lq, M, L, P], '
                         f'got shape {tuple(attention_weights.shape)}')
    if not isinstance(im2col_step, int) or im2col_step < 1:
        raise ValueError(f'ms_deform_attn: im2col_step must be a positive int, got {im2col_step!r}')

    N, S, M, D = value.shape
    n_loc, q_loc, m_loc, l_loc, p_loc, _ = sampling_locations.shape
    n_w, q_w, m_w, l_w, p_w = attention_weights.shape
    if not (n_loc == n_w == N):
        raise ValueError(f'ms_deform_attn: batch mismatch: value has N={N}, sampling_locations {n_loc}, '
                         f'attention_weights {n_w}')
    if not (m_loc == m_w == M):
        raise ValueError(f'ms_deform_attn: head count mismatch: value has M={M} heads, '
                         f'sampling_locations {m_loc}, attention_weights {m_w}')
    if q_loc != q_w:
        raise ValueError(f'ms_deform_attn: query count mismatch: sampling_locations has Lq={q_loc}, '
                         f'attention_weights {q_w}')
    if p_loc != p_w:
        raise ValueError(f'ms_deform_attn: points mismatch: sampling_locations has P={p_loc} points, '
                         f'attention_weights {p_w}')

    spatial_shapes = torch.as_tensor(spatial_shapes)
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError('ms_deform_attn: spatial_shapes must be [L, 2] (H, W per level), '
                         f'got shape {tuple(spatial_shapes.shape)}')
    shapes = _shape_list(spatial_shapes)
    L = len(shapes)
    if not (l_loc == l_w == L):
        raise ValueError(f'ms_deform_attn: levels mismatch: spatial_shapes has L={L} levels, '
                         f'sampling_locations {l_loc}, attention_weights {l_w}')
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f'ms_deform_attn: spatial_shapes must be positive, got {shapes}')
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(f'ms_deform_attn: spatial_shapes {shapes} cover sum(H*W)={sum(sizes)} positions '
                         f'but value has S={S}')
    if level_start_index is not None:
        starts = [int(s) for s in torch.as_tensor(level_start_index).reshape(-1).tolist()]
        expected = [sum(sizes[:i]) for i in range(L)]
        if starts != expected:
            raise ValueError(f'ms_deform_attn: level_start_index {starts} does not match spatial_shapes '
                             f'(expected {expected})')
    return shapes


def _common_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights):
    """Reference implementation with F.grid_sample (bilinear, zero padding, align_corners=False).

    Same arguments as Deformable-DETR's `ms_deform_attn_core_pytorch`; spatial_shapes may be a [L, 2]
    tensor or a list of (H, W). Differentiable w.r.t. value, locations and weights; runs anywhere.
    """
    shapes = _shape_list(spatial_shapes)
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out_dtype = _common_dtype(value, sampling_locations, attention_weights)
    # grid_sample on CPU has no half kernels: compute in float32 there
    compute_dtype = torch.float32 if value.device.type == 'cpu' and out_dtype in (torch.float16, torch.bfloat16) \
        else out_dtype
    value_levels = value.to(compute_dtype).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(compute_dtype) - 1  # grid_sample's [-1, 1] convention
    weights = attention_weights.to(compute_dtype)

    output = None
    for level, (H, W) in enumerate(shapes):
        v = value_levels[level].permute(0, 2, 3, 1).reshape(N * M, D, H, W)      # [N*M, D, H, W]
        grid = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Q, P, 2)      # [N*M, Q, P, 2]
        sampled = F.grid_sample(v, grid, mode='bilinear', padding_mode='zeros',
                                align_corners=False)                              # [N*M, D, Q, P]
        w = weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Q, P)       # [N*M, 1, Q, P]
        term = (sampled * w).sum(-1)                                              # [N*M, D, Q]
        output = term if output is None else output + term
    output = output.reshape(N, M * D, Q).transpose(1, 2)                         # [N, Q, M*D]
    return output.to(out_dtype).contiguous()


# Deformable-DETR's name for the same function
ms_deform_attn_core_pytorch = ms_deform_attn_pytorch


class MSDeformAttnFunction(Function):
    """Autograd wrapper of the CUDA kernels; same apply() arguments as Deformable-DETR's."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                im2col_step):
        ext = get_extension()
        if ext is None:
            raise RuntimeError('MSDeformAttnFunction: the CUDA extension is not available '
                               '(build it with `cd ops && python setup.py build_ext --inplace`)')
        ctx.im2col_step = im2col_step
        output = ext.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                             im2col_step)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = get_extension().backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.im2col_step)
        return grad_value, None, None, grad_locations, grad_weights, None


def select_backend(value, backend='auto'):
    """'cuda' or 'pytorch' for these inputs. auto: the kernel for CUDA tensors when it is available,
    unless LRB_MSDA_FORCE_PYTORCH=1."""
    if backend not in BACKENDS:
        raise ValueError(f'ms_deform_attn: backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'pytorch':
        return 'pytorch'
    if backend == 'cuda':
        if not value.is_cuda:
            raise ValueError("ms_deform_attn: backend='cuda' needs CUDA tensors")
        if get_extension() is None:
            raise RuntimeError("ms_deform_attn: backend='cuda' but the CUDA extension could not be loaded")
        return 'cuda'
    if not value.is_cuda or os.environ.get(FORCE_PYTORCH_ENV, '0') not in ('', '0'):
        return 'pytorch'
    return 'cuda' if get_extension() is not None else 'pytorch'


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64, backend='auto'):
    """Multi-scale deformable attention -> [N, Lq, M * D]; see the module docstring for shapes.

    backend: 'auto' (CUDA kernel for CUDA tensors when built, else PyTorch), 'cuda' or 'pytorch'.
    """
    shapes = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          im2col_step)
    if select_backend(value, backend) == 'pytorch':
        return ms_deform_attn_pytorch(value, shapes, sampling_locations, attention_weights)

    dtype = _common_dtype(value, sampling_locations, attention_weights)
    device = value.device
    spatial_shapes = torch.as_tensor(spatial_shapes).to(device=device, dtype=torch.long).contiguous()
    level_start_index = torch.as_tensor([sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))],
                                        dtype=torch.long).to(device)
    return MSDeformAttnFunction.apply(value.to(dtype).contiguous(), spatial_shapes, level_start_index,
                                      sampling_locations.to(dtype).contiguous(),
                                      attention_weights.to(dtype).contiguous(), im2col_step)
