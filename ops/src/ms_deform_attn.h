// Multi-scale deformable attention: declarations shared by the binding and the CUDA sources.
// Interface (Deformable-DETR / mmcv layout):
//   value              [N, S, M, D]        S = sum over levels of H_l * W_l
//   spatial_shapes     [L, 2] int64        (H_l, W_l)
//   level_start_index  [L]    int64        offset of level l in S
//   sampling_loc       [N, Lq, M, L, P, 2] (x, y) normalized to [0, 1]
//   attn_weight        [N, Lq, M, L, P]
//   output             [N, Lq, M * D]
#pragma once

#include <vector>

#include <ATen/ATen.h>

at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t im2col_step);

// Returns {grad_value, grad_sampling_loc, grad_attn_weight}, each in the input dtype.
std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t im2col_step);
