// Python binding and argument checks for the multi-scale deformable attention CUDA kernels.
// CPU tensors are not handled here: the Python package runs its PyTorch implementation for them.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace {

void check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t im2col_step) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: value must be a CUDA tensor");
  TORCH_CHECK(spatial_shapes.is_cuda() && level_start_index.is_cuda() &&
                  sampling_loc.is_cuda() && attn_weight.is_cuda(),
              "ms_deform_attn: all inputs must be CUDA tensors");
  TORCH_CHECK(spatial_shapes.device() == value.device() && level_start_index.device() == value.device() &&
                  sampling_loc.device() == value.device() && attn_weight.device() == value.device(),
              "ms_deform_attn: all inputs must be on the same device");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D]");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2]");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
              "ms_deform_attn: level_start_index must be [L]");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_loc must be [N, Lq, M, L, P, 2]");
  TORCH_CHECK(attn_weight.dim() == 5, "ms_deform_attn: attn_weight must be [N, Lq, M, L, P]");
  TORCH_CHECK(sampling_loc.size(0) == value.size(0) && attn_weight.size(0) == value.size(0),
              "ms_deform_attn: batch size mismatch");
  TORCH_CHECK(sampling_loc.size(2) == value.size(2) && attn_weight.size(2) == value.size(2),
              "ms_deform_attn: head count mismatch");
  TORCH_CHECK(sampling_loc.size(3) == spatial_shapes.size(0) && attn_weight.size(3) == spatial_shapes.size(0),
              "ms_deform_attn: level count mismatch");
  TORCH_CHECK(attn_weight.size(1) == sampling_loc.size(1) && attn_weight.size(4) == sampling_loc.size(4),
              "ms_deform_attn: sampling_loc and attn_weight disagree on queries or points");
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type() &&
                  attn_weight.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_loc and attn_weight must share one dtype");
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn: im2col_step must be positive");
}

at::Tensor forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    int64_t im2col_step) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  return ms_deform_attn_cuda_forward(
      value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
      sampling_loc.contiguous(), attn_weight.contiguous(), im2col_step);
}

std::vector<at::Tensor> backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight,
    const at::Tensor& grad_output,
    int64_t im2col_step) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  TORCH_CHECK(grad_output.is_cuda() && grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must be on the device of value");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_loc.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must be [N, Lq, M * D]");
  return ms_deform_attn_cuda_backward(
      value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
      sampling_loc.contiguous(), attn_weight.contiguous(),
      grad_output.to(value.scalar_type()).contiguous(), im2col_step);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention (CUDA), Deformable-DETR interface";
  m.def("forward", &forward, "ms_deform_attn forward (CUDA)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"), py::arg("im2col_step"));
  m.def("backward", &backward, "ms_deform_attn backward (CUDA): grad_value, grad_sampling_loc, grad_attn_weight",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"), py::arg("grad_output"), py::arg("im2col_step"));
}
