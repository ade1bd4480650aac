// Multi-scale deformable attention, CUDA forward and backward.
//
// One thread per output element (n, q, m, d): channels of one head are adjacent in memory, so a warp
// reads value rows coalesced. Sampling follows grid_sample(align_corners=False, padding_mode='zeros'):
// a location (x, y) in [0, 1] maps to pixel coordinates (x * W - 0.5, y * H - 0.5) and corners outside
// the level contribute zero.
//
// Precision: every dtype (float, double, half, bfloat16) is read and written in its own type, while
// arithmetic runs in at::opmath_type (float for half/bfloat16). The backward accumulates all three
// gradients in opmath_type buffers (float for half/bfloat16) with native float/double atomicAdd, and
// casts them to the input dtype once at the end: no half-precision atomics, no precision lost while
// thousands of queries add into one value pixel.
//
// Gradients w.r.t. sampling locations and attention weights are sums over the D channels of a head.
// Lanes that hold the channels of one head inside a warp (a segment of gcd(D, 32) lanes) reduce with
// warp shuffles; the segment leader then stores (D <= 32: it owns the element) or adds atomically
// (D > 32: several warps share it).
#include <algorithm>
#include <numeric>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ms_deform_attn.h"

namespace {

constexpr int kThreads = 256;  // a multiple of the warp size: every warp is complete (backward shuffles)
constexpr int kWarpSize = 32;

// Corners and weights of one bilinear sample at pixel coordinates (h, w) of an H x W level.
template <typename acc_t>
struct BilinearSample {
  int h0, w0;                       // top-left corner; may be -1 (outside)
  acc_t lh, lw;                     // fractional offsets towards the bottom-right corner
  bool top, bottom, left, right;    // which corner rows / columns lie inside the level

  __device__ __forceinline__ BilinearSample(acc_t h, acc_t w, int H, int W) {
    const acc_t hf = floor(h);
    const acc_t wf = floor(w);
    h0 = static_cast<int>(hf);
    w0 = static_cast<int>(wf);
    lh = h - hf;
    lw = w - wf;
    top = h0 >= 0;
    bottom = h0 + 1 <= H - 1;
    left = w0 >= 0;
    right = w0 + 1 <= W - 1;
  }
};

// Reads value at (row, col) of a level; `level` points at (n, level start, m, d), rows are `stride` apart.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t read_pixel(const scalar_t* level, int W, int64_t stride, int row, int col) {
  return static_cast<acc_t>(level[(static_cast<int64_t>(row) * W + col) * stride]);
}

template <typename scalar_t>
__global__ void ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value,             // [n, S, M, D]
    const int64_t* __restrict__ spatial_shapes,     // [L, 2]
    const int64_t* __restrict__ level_start_index,  // [L]
    const scalar_t* __restrict__ sampling_loc,      // [n, Q, M, L, P, 2]
    const scalar_t* __restrict__ attn_weight,       // [n, Q, M, L, P]
    scalar_t* __restrict__ output,                  // [n, Q, M, D]
    int64_t total, int64_t S, int64_t M, int64_t D, int64_t Q, int L, int P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;

  const int64_t d = idx % D;
  const int64_t head = idx / D;  // flat (n, q, m)
  const int64_t m = head % M;
  const int64_t n = head / (M * Q);
  const int64_t stride = M * D;  // distance between neighbouring pixels in value
  const scalar_t* value_nmd = value + n * S * stride + m * D + d;
  const scalar_t* loc = sampling_loc + head * L * P * 2;
  const scalar_t* weight = attn_weight + head * L * P;

  acc_t acc = 0;
  for (int l = 0; l < L; ++l) {
    const int H = static_cast<int>(spatial_shapes[2 * l]);
    const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
    const scalar_t* level = value_nmd + level_start_index[l] * stride;
    for (int p = 0; p < P; ++p, loc += 2, ++weight) {
      const acc_t h = static_cast<acc_t>(loc[1]) * H - acc_t(0.5);
      const acc_t w = static_cast<acc_t>(loc[0]) * W - acc_t(0.5);
      if (!(h > -1 && w > -1 && h < H && w < W)) continue;  // all four corners outside
      const BilinearSample<acc_t> s(h, w, H, W);
      const acc_t hh = 1 - s.lh, hw = 1 - s.lw;
      acc_t sample = 0;
      if (s.top && s.left) sample += hh * hw * read_pixel<scalar_t, acc_t>(level, W, stride, s.h0, s.w0);
      if (s.top && s.right) sample += hh * s.lw * read_pixel<scalar_t, acc_t>(level, W, stride, s.h0, s.w0 + 1);
      if (s.bottom && s.left) sample += s.lh * hw * read_pixel<scalar_t, acc_t>(level, W, stride, s.h0 + 1, s.w0);
      if (s.bottom && s.right) sample += s.lh * s.lw * read_pixel<scalar_t, acc_t>(level, W, stride, s.h0 + 1, s.w0 + 1);
      acc += static_cast<acc_t>(*weight) * sample;
    }
  }
  output[idx] = static_cast<scalar_t>(acc);
}

template <typename acc_t>
__device__ __forceinline__ acc_t segment_sum(acc_t v, int segment) {
  // xor offsets below `segment` stay inside an aligned segment of lanes
  for (int offset = segment / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value,             // [n, S, M, D]
    const int64_t* __restrict__ spatial_shapes,     // [L, 2]
    const int64_t* __restrict__ level_start_index,  // [L]
    const scalar_t* __restrict__ sampling_loc,      // [n, Q, M, L, P, 2]
    const scalar_t* __restrict__ attn_weight,       // [n, Q, M, L, P]
    const scalar_t* __restrict__ grad_output,       // [n, Q, M, D]
    at::opmath_type<scalar_t>* __restrict__ grad_value,   // [n, S, M, D]
    at::opmath_type<scalar_t>* __restrict__ grad_loc,     // [n, Q, M, L, P, 2]
    at::opmath_type<scalar_t>* __restrict__ grad_weight,  // [n, Q, M, L, P]
    int64_t total, int64_t S, int64_t M, int64_t D, int64_t Q, int L, int P, int segment) {
  using acc_t = at::opmath_type<scalar_t>;
  // Threads past the end stay alive (with zero contributions) so that every warp shuffle is complete.
  // total is a multiple of D, hence of `segment`: a segment is entirely active or entirely idle.
  const int64_t raw_idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = raw_idx < total;
  const int64_t idx = active ? raw_idx : total - 1;

  const int64_t d = idx % D;
  const int64_t head = idx / D;
  const int64_t m = head % M;
  const int64_t n = head / (M * Q);
  const int64_t stride = M * D;
  const int64_t value_offset = n * S * stride + m * D + d;
  const scalar_t* value_nmd = value + value_offset;
  acc_t* grad_value_nmd = grad_value + value_offset;
  const int64_t point_offset = head * L * P;
  const scalar_t* loc = sampling_loc + 2 * point_offset;
  const scalar_t* weight = attn_weight + point_offset;
  const acc_t grad_out = active ? static_cast<acc_t>(grad_output[idx]) : acc_t(0);
  const bool leader = active && (d % segment == 0);
  const bool owner = segment == D;  // the leader is the only writer of its (l, p) gradients

  for (int l = 0; l < L; ++l) {
    const int H = static_cast<int>(spatial_shapes[2 * l]);
    const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
    const int64_t level_offset = level_start_index[l] * stride;
    const scalar_t* level = value_nmd + level_offset;
    acc_t* grad_level = grad_value_nmd + level_offset;
    for (int p = 0; p < P; ++p) {
      const int64_t k = l * P + p;  // point index inside this head
      const acc_t h = static_cast<acc_t>(loc[2 * k + 1]) * H - acc_t(0.5);
      const acc_t w = static_cast<acc_t>(loc[2 * k]) * W - acc_t(0.5);
      const acc_t a = static_cast<acc_t>(weight[k]);
      acc_t g_weight = 0, g_x = 0, g_y = 0;
      if (active && h > -1 && w > -1 && h < H && w < W) {
        const BilinearSample<acc_t> s(h, w, H, W);
        const acc_t hh = 1 - s.lh, hw = 1 - s.lw;
        const acc_t grad_sample = grad_out * a;
        acc_t v00 = 0, v01 = 0, v10 = 0, v11 = 0;
        if (s.top && s.left) {
          v00 = read_pixel<scalar_t, acc_t>(level, W, stride, s.h0, s.w0);
          gpuAtomicAdd(grad_level + (static_cast<int64_t>(s.h0) * W + s.w0) * stride, hh * hw * grad_sample);
        }
        if (s.top && s.right) {
          v01 = read_pixel<scalar_t, acc_t>(level, W, stride, s.h0, s.w0 + 1);
          gpuAtomicAdd(grad_level + (static_cast<int64_t>(s.h0) * W + s.w0 + 1) * stride, hh * s.lw * grad_sample);
        }
        if (s.bottom && s.left) {
          v10 = read_pixel<scalar_t, acc_t>(level, W, stride, s.h0 + 1, s.w0);
          gpuAtomicAdd(grad_level + (static_cast<int64_t>(s.h0 + 1) * W + s.w0) * stride, s.lh * hw * grad_sample);
        }
        if (s.bottom && s.right) {
          v11 = read_pixel<scalar_t, acc_t>(level, W, stride, s.h0 + 1, s.w0 + 1);
          gpuAtomicAdd(grad_level + (static_cast<int64_t>(s.h0 + 1) * W + s.w0 + 1) * stride, s.lh * s.lw * grad_sample);
        }
        const acc_t sample = hh * hw * v00 + hh * s.lw * v01 + s.lh * hw * v10 + s.lh * s.lw * v11;
        g_weight = grad_out * sample;
        // d(sample)/dw and d(sample)/dh in pixels; d(pixel)/d(location) is W (x) and H (y)
        g_x = grad_sample * (hh * (v01 - v00) + s.lh * (v11 - v10)) * W;
        g_y = grad_sample * (hw * (v10 - v00) + s.lw * (v11 - v01)) * H;
      }
      g_weight = segment_sum(g_weight, segment);
      g_x = segment_sum(g_x, segment);
      g_y = segment_sum(g_y, segment);
      if (leader) {
        const int64_t j = point_offset + k;
        if (owner) {
          grad_weight[j] = g_weight;
          grad_loc[2 * j] = g_x;
          grad_loc[2 * j + 1] = g_y;
        } else {
          gpuAtomicAdd(grad_weight + j, g_weight);
          gpuAtomicAdd(grad_loc + 2 * j, g_x);
          gpuAtomicAdd(grad_loc + 2 * j + 1, g_y);
        }
      }
    }
  }
}

struct Sizes {
  int64_t N, S, M, D, Q;
  int L, P;
};

Sizes read_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& sampling_loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), sampling_loc.size(1),
          static_cast<int>(spatial_shapes.size(0)), static_cast<int>(sampling_loc.size(4))};
}

int64_t num_blocks(int64_t total) { return (total + kThreads - 1) / kThreads; }

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t im2col_step) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes z = read_sizes(value, spatial_shapes, sampling_loc);
  auto output = at::empty({z.N, z.Q, z.M, z.D}, value.options());
  if (output.numel() == 0) return output.view({z.N, z.Q, z.M * z.D});
  if (z.S == 0 || z.L == 0 || z.P == 0) return output.zero_().view({z.N, z.Q, z.M * z.D});

  // im2col_step keeps the Deformable-DETR meaning: batch items per kernel launch
  const int64_t step = std::min(z.N, im2col_step);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    for (int64_t n0 = 0; n0 < z.N; n0 += step) {
      const int64_t n = std::min(step, z.N - n0);
      const int64_t total = n * z.Q * z.M * z.D;
      ms_deform_attn_forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>() + n0 * z.S * z.M * z.D,
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_loc.data_ptr<scalar_t>() + n0 * z.Q * z.M * z.L * z.P * 2,
          attn_weight.data_ptr<scalar_t>() + n0 * z.Q * z.M * z.L * z.P,
          output.data_ptr<scalar_t>() + n0 * z.Q * z.M * z.D,
          total, z.S, z.M, z.D, z.Q, z.L, z.P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output.view({z.N, z.Q, z.M * z.D});
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t im2col_step) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes z = read_sizes(value, spatial_shapes, sampling_loc);
  // float accumulators for half/bfloat16 (see the header comment), the input dtype otherwise
  const auto acc_options = value.options().dtype(at::toOpMathType(value.scalar_type()));
  auto grad_value = at::zeros(value.sizes(), acc_options);
  auto grad_loc = at::zeros(sampling_loc.sizes(), acc_options);
  auto grad_weight = at::zeros(attn_weight.sizes(), acc_options);

  if (grad_output.numel() > 0 && z.S > 0 && z.L > 0 && z.P > 0) {
    const int64_t step = std::min(z.N, im2col_step);
    const int segment = std::gcd(static_cast<int>(z.D), kWarpSize);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t n0 = 0; n0 < z.N; n0 += step) {
        const int64_t n = std::min(step, z.N - n0);
        const int64_t total = n * z.Q * z.M * z.D;
        const int64_t value_offset = n0 * z.S * z.M * z.D;
        const int64_t point_offset = n0 * z.Q * z.M * z.L * z.P;
        ms_deform_attn_backward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>() + value_offset,
            spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(),
            sampling_loc.data_ptr<scalar_t>() + 2 * point_offset,
            attn_weight.data_ptr<scalar_t>() + point_offset,
            grad_output.data_ptr<scalar_t>() + n0 * z.Q * z.M * z.D,
            grad_value.data_ptr<acc_t>() + value_offset,
            grad_loc.data_ptr<acc_t>() + 2 * point_offset,
            grad_weight.data_ptr<acc_t>() + point_offset,
            total, z.S, z.M, z.D, z.Q, z.L, z.P, segment);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_loc.to(dtype), grad_weight.to(dtype)};
}
