"""Multi-scale deformable attention (Deformable-DETR interface): a CUDA kernel with a PyTorch twin.

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64)        -> [N, Lq, M * D]
    MSDeformAttn(d_model, n_levels, n_heads, n_points)

CUDA tensors use the compiled kernel when it is available (built by `cd ops && python setup.py
build_ext --inplace`, or JIT-compiled on first use; LRB_MSDA_JIT=0 disables that), everything else the
PyTorch implementation. LRB_MSDA_FORCE_PYTORCH=1 (or backend='pytorch') forces the PyTorch path.
"""
from .functions import (MSDeformAttnFunction, check_inputs, default_build_dir, get_extension, load_extension,
                        ms_deform_attn, ms_deform_attn_core_pytorch, ms_deform_attn_pytorch, select_backend)
from .modules import MSDeformAttn

__all__ = ['MSDeformAttn', 'MSDeformAttnFunction', 'check_inputs', 'default_build_dir', 'get_extension',
           'load_extension', 'ms_deform_attn', 'ms_deform_attn_core_pytorch', 'ms_deform_attn_pytorch',
           'select_backend']
