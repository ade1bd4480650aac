"""ops/: multi-scale deformable attention (PyTorch path on CPU, CUDA build check) and MSDACrossScale."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ops
from ops.functions import ms_deform_attn_func

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# helpers

def level_start_index_of(shapes):
    sizes = [h * w for h, w in shapes]
    return torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long)


def make_inputs(shapes, N=2, Q=3, M=2, D=4, P=2, loc_range=(0.0, 1.0), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    lo, hi = loc_range
    locations = lo + (hi - lo) * torch.rand(N, Q, M, L, P, 2, generator=g, dtype=dtype)
    weights = torch.rand(N, Q, M, L, P, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, torch.tensor(shapes, dtype=torch.long), level_start_index_of(shapes), locations, weights


def slow_loop_msda(value, shapes, locations, weights):
    """Independent reference: explicit bilinear sampling with zero padding, one sample at a time.

    Pixel (i, j) of an H x W level covers [j, j+1) x [i, i+1) in units of pixels, so a normalized
    location (x, y) sits at continuous pixel coordinates (x * W - 0.5, y * H - 0.5) relative to centres.
    Built from differentiable tensor ops so autograd gives the gradients too.
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    rows = []
    for n in range(N):
        for q in range(Q):
            heads = []
            for m in range(M):
                acc = value.new_zeros(D)
                for lvl, (H, W) in enumerate(shapes):
                    for p in range(P):
                        x = locations[n, q, m, lvl, p, 0] * W - 0.5
                        y = locations[n, q, m, lvl, p, 1] * H - 0.5
                        x0, y0 = math.floor(x.detach().item()), math.floor(y.detach().item())
                        fx, fy = x - x0, y - y0
                        sample = value.new_zeros(D)
                        for dy, wy in ((0, 1 - fy), (1, fy)):
                            for dx, wx in ((0, 1 - fx), (1, fx)):
                                row, col = y0 + dy, x0 + dx
                                if 0 <= row < H and 0 <= col < W:  # zero padding outside
                                    sample = sample + wy * wx * value[n, starts[lvl] + row * W + col, m]
                        acc = acc + weights[n, q, m, lvl, p] * sample
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(N, Q, M * D)


def assert_matches_slow_loop(shapes, **kw):
    value, spatial_shapes, start_index, locations, weights = make_inputs(shapes, dtype=torch.float64, **kw)
    tensors = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ref = [t.clone().requires_grad_() for t in (value, locations, weights)]

    out = ops.ms_deform_attn(tensors[0], spatial_shapes, start_index, tensors[1], tensors[2])
    expected = slow_loop_msda(ref[0], shapes, ref[1], ref[2])
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, upstream)
    expected_grads = torch.autograd.grad(expected, ref, upstream)
    for name, g, e in zip(('value', 'sampling_locations', 'attention_weights'), grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f'gradient w.r.t. {name}')


# ----------------------------------------------------------------------------------------------------------
# PyTorch path vs the slow loop

def test_matches_slow_loop_multi_level():
    assert_matches_slow_loop([(4, 5), (2, 3), (1, 2)])


def test_matches_slow_loop_locations_outside_unit_square():
    # many samples fall partly or wholly outside: zero padding must match, gradients included
    assert_matches_slow_loop([(3, 4), (2, 2)], loc_range=(-0.4, 1.4), seed=1)


def test_matches_slow_loop_one_level():
    assert_matches_slow_loop([(5, 3)], Q=4, P=3, seed=2)


def test_matches_slow_loop_level_of_size_one():
    assert_matches_slow_loop([(3, 3), (1, 1)], loc_range=(-0.2, 1.2), seed=3)


def test_matches_slow_loop_non_square_levels():
    assert_matches_slow_loop([(2, 7), (6, 1)], M=3, D=2, seed=4)


def test_pixel_convention_hits_pixel_centres():
    # location ((j + 0.5) / W, (i + 0.5) / H) reads exactly pixel (i, j); x = 0 reads half of column 0
    H, W = 3, 4
    value = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1, 1)
    shapes = torch.tensor([[H, W]])
    locs = torch.tensor([[(2 + 0.5) / W, (1 + 0.5) / H], [0.0, 1.5 / H]], dtype=torch.float64)
    locations = locs.view(1, 2, 1, 1, 1, 2)
    weights = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    out = ops.ms_deform_attn(value, shapes, torch.tensor([0]), locations, weights).flatten()
    torch.testing.assert_close(out, torch.tensor([1 * W + 2, 0.5 * (1 * W + 0)], dtype=torch.float64))


def test_far_outside_locations_give_zero_output_and_gradients():
    value, shapes, starts, locations, weights = make_inputs([(3, 3), (2, 2)], dtype=torch.float64)
    locations = (locations + 2.0).requires_grad_()
    value.requires_grad_()
    out = ops.ms_deform_attn(value, shapes, starts, locations, weights)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(value.grad) == 0 and torch.count_nonzero(locations.grad) == 0


def test_gradcheck_float64():
    value, shapes, starts, locations, weights = make_inputs([(3, 2), (1, 1)], N=1, Q=2, M=2, D=2, P=2,
                                                            loc_range=(-0.1, 1.1), dtype=torch.float64, seed=5)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    def fn(v, loc, w):
        return ops.ms_deform_attn(v, shapes, starts, loc, w)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_half_and_mixed_dtypes_on_cpu():
    value, shapes, starts, locations, weights = make_inputs([(4, 4), (2, 2)])
    ref = ops.ms_deform_attn(value, shapes, starts, locations, weights)
    out_bf16 = ops.ms_deform_attn(value.bfloat16(), shapes, starts, locations.bfloat16(), weights.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref, rtol=0.05, atol=0.05)
    # bf16 value with fp32 locations (autocast layout) promotes to fp32
    out_mixed = ops.ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights)
    assert out_mixed.dtype == torch.float32
    torch.testing.assert_close(out_mixed, ref, rtol=0.02, atol=0.02)


def test_spatial_shapes_as_list_and_level_start_index_none():
    value, shapes, starts, locations, weights = make_inputs([(2, 3), (1, 2)])
    ref = ops.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(ops.ms_deform_attn(value, [(2, 3), (1, 2)], None, locations, weights), ref)
    torch.testing.assert_close(ops.ms_deform_attn_core_pytorch(value, shapes, locations, weights), ref)


# ----------------------------------------------------------------------------------------------------------
# dispatch and input errors

def test_cpu_never_touches_the_extension(monkeypatch):
    def fail():
        raise AssertionError('CPU inputs must not load the CUDA extension')
    monkeypatch.setattr(ms_deform_attn_func, 'get_extension', fail)
    value, shapes, starts, locations, weights = make_inputs([(2, 2)])
    assert ops.ms_deform_attn(value, shapes, starts, locations, weights).shape == (2, 3, 8)
    assert ops.select_backend(value) == 'pytorch'
    monkeypatch.setenv('LRB_MSDA_FORCE_PYTORCH', '1')
    assert ops.select_backend(value) == 'pytorch'


def test_backend_argument_errors():
    value, shapes, starts, locations, weights = make_inputs([(2, 2)])
    with pytest.raises(ValueError, match='backend must be one of'):
        ops.ms_deform_attn(value, shapes, starts, locations, weights, backend='triton')
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ops.ms_deform_attn(value, shapes, starts, locations, weights, backend='cuda')


@pytest.mark.parametrize('change, message', [
    (lambda a: {**a, 'spatial_shapes': torch.tensor([[4, 4], [2, 3]])},
     r'cover sum\(H\*W\)=22 positions but value has S=20'),
    (lambda a: {**a, 'value': a['value'][:, :, :1]}, r'head count mismatch: value has M=1'),
    (lambda a: {**a, 'attention_weights': a['attention_weights'][:, :, :1]}, r'head count mismatch'),
    (lambda a: {**a, 'sampling_locations': a['sampling_locations'][:, :, :, :1]},
     r'levels mismatch: spatial_shapes has L=2'),
    (lambda a: {**a, 'attention_weights': a['attention_weights'][..., :1]}, r'points mismatch'),
    (lambda a: {**a, 'attention_weights': a['attention_weights'][:, :2]}, r'query count mismatch'),
    (lambda a: {**a, 'value': a['value'][:1]}, r'batch mismatch'),
    (lambda a: {**a, 'level_start_index': torch.tensor([0, 4])}, r'level_start_index \[0, 4\] does not match'),
    (lambda a: {**a, 'spatial_shapes': torch.tensor([4, 4])}, r'spatial_shapes must be \[L, 2\]'),
    (lambda a: {**a, 'value': a['value'].flatten(2)}, r'value must be \[N, S, M, D\]'),
    (lambda a: {**a, 'sampling_locations': a['sampling_locations'][..., 0]}, r'sampling_locations must be'),
    (lambda a: {**a, 'im2col_step': 0}, r'im2col_step must be a positive int'),
])
def test_inconsistent_shapes_raise_clear_errors(change, message):
    value, shapes, starts, locations, weights = make_inputs([(4, 4), (2, 2)])
    args = dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=locations,
                attention_weights=weights, im2col_step=64)
    with pytest.raises(ValueError, match=message):
        ops.ms_deform_attn(**change(args))


# ----------------------------------------------------------------------------------------------------------
# MSDeformAttn module

def test_msdeformattn_module_shapes_and_init():
    shapes = [(6, 5), (3, 3), (1, 2)]
    module = ops.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    N, Q, S = 2, 7, sum(h * w for h, w in shapes)
    query, feats = torch.randn(N, Q, 32), torch.randn(N, S, 32)
    spatial_shapes, starts = torch.tensor(shapes), level_start_index_of(shapes)
    out = module(query, torch.rand(N, Q, 3, 2), feats, spatial_shapes, starts)
    assert out.shape == (N, Q, 32)
    out_boxes = module(query, torch.rand(N, Q, 3, 4), feats, spatial_shapes, starts)
    assert out_boxes.shape == (N, Q, 32)
    # Deformable-DETR init: head 0 points along +x at 1, 2 pixels; uniform attention
    bias = module.sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    # padding mask zeroes every value: the output is the output projection's (zero) bias
    masked = module(query, torch.rand(N, Q, 3, 2), feats, spatial_shapes, starts,
                    torch.ones(N, S, dtype=torch.bool))
    assert torch.count_nonzero(masked) == 0
    with pytest.raises(ValueError, match='reference_points must be'):
        module(query, torch.rand(N, Q, 2, 2), feats, spatial_shapes, starts)
    with pytest.raises(ValueError, match='divisible by n_heads'):
        ops.MSDeformAttn(d_model=30, n_heads=4)


# ----------------------------------------------------------------------------------------------------------
# MSDACrossScale

CHANNELS = [16, 32, 48, 64]


def make_cross_scale():
    from lib.model.cross_scale_msda import MSDACrossScale
    torch.manual_seed(0)
    return MSDACrossScale(CHANNELS, d_model=32, num_layers=2, n_heads=4, n_points=2)


@pytest.mark.parametrize('sizes', [[(16, 16), (8, 8), (4, 4), (2, 2)], [(12, 20), (6, 10), (3, 5), (2, 3)]])
def test_cross_scale_keeps_stage_shapes(sizes):
    module = make_cross_scale()
    features = [torch.randn(2, c, h, w) for c, (h, w) in zip(CHANNELS, sizes)]
    outputs = module(features)
    assert [o.shape for o in outputs] == [f.shape for f in features]
    assert all(not torch.equal(o, f) for o, f in zip(outputs, features))  # the module does something


def test_cross_scale_every_parameter_learns():
    module = make_cross_scale()
    features = [torch.randn(2, c, s, s) for c, s in zip(CHANNELS, (8, 4, 2, 1))]
    target = [torch.randn_like(f) for f in features]

    def loss_and_grads():
        module.zero_grad()
        loss = sum((o - t).square().mean() for o, t in zip(module(features), target))
        loss.backward()
        return {name: p.grad for name, p in module.named_parameters()}

    grads = loss_and_grads()
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # Deformable-DETR zero-initialises the offset / attention-weight projections, so the query side
    # (positions, level embedding) gets its first gradient after one step; everything else at once.
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    grads = loss_and_grads()
    no_grad = [name for name, g in grads.items() if g is None or torch.count_nonzero(g) == 0]
    assert not no_grad, f'parameters without gradient: {no_grad}'


def test_cross_scale_rejects_wrong_inputs():
    module = make_cross_scale()
    with pytest.raises(ValueError, match='expected 4 feature maps'):
        module([torch.randn(1, 16, 4, 4)])
    with pytest.raises(ValueError, match=r'level 1 must be \[B, 32, H, W\]'):
        module([torch.randn(1, c, 4, 4) for c in (16, 16, 48, 64)])


# ----------------------------------------------------------------------------------------------------------
# CUDA build (compiles only; running needs a GPU: bench/gpu_check.py)

def _cuda_toolkit_available():
    if shutil.which('nvcc') is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    return CUDA_HOME is not None and torch.version.cuda is not None and is_ninja_available()


@pytest.mark.skipif(not _cuda_toolkit_available(), reason='needs nvcc on PATH, ninja and a CUDA build of torch')
def test_cuda_extension_compiles(tmp_path):
    # A fresh process, so the JIT build starts from nothing; one architecture (sm_90) is enough to check
    # that the sources compile (bench/gpu_check.py builds for the GPU it runs on and checks the values).
    script = ('import sys, ops\n'
              'try:\n'
              '    print(ops.load_extension(build_dir=sys.argv[1], arch_list="9.0").__name__)\n'
              'except ImportError as e:  # built, but this machine cannot load CUDA libraries\n'
              '    print("import failed:", e)\n')
    env = dict(os.environ, MAX_JOBS=os.environ.get('MAX_JOBS', '2'))
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    built = list(tmp_path.glob('_msda_cuda*.so'))
    assert built, f'no shared object in {tmp_path}: {sorted(p.name for p in tmp_path.iterdir())}'


# ----------------------------------------------------------------------------------------------------------
# The CUDA kernel source, run on the CPU: ops/src/ms_deform_attn_cuda.cu compiled as host C++ with a shim in
# which every warp is 32 lanes run as fibers (ucontext) on one thread, switched round-robin at each shuffle
# (a shuffle that not all 32 lanes reach is an error, where a GPU's result would be undefined), and atomics are
# std::atomic_ref. This checks the kernels' indexing, bilinear weights, warp reductions, atomics and
# im2col_step chunking against the PyTorch path without a GPU. Fibers, not threads: 32 threads meeting at a
# barrier at every shuffle took 20-35 s a case on 2 busy cores instead of 1 s.

HOST_SHIM = r"""
#pragma once
#include <atomic>
#include <cmath>
#include <functional>
#include <vector>
#include <ucontext.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct EmuDim3 { long long x; };
inline EmuDim3 blockIdx, threadIdx;  // the running lane's, set at each switch
inline EmuDim3 blockDim{256};
inline ucontext_t emu_scheduler, emu_lanes[32];
inline bool emu_done[32];
inline double emu_shared[32];
inline int emu_lane = 0;
inline std::function<void()> emu_body;
inline void emu_entry() { emu_body(); emu_done[emu_lane] = true; }  // then back to the scheduler (uc_link)
inline void emu_sync() { swapcontext(&emu_lanes[emu_lane], &emu_scheduler); }
template <class T> T __shfl_xor_sync(unsigned, T v, int offset) {
  emu_shared[emu_lane] = static_cast<double>(v);
  emu_sync();  // every lane has written
  T r = static_cast<T>(emu_shared[emu_lane ^ offset]);
  emu_sync();  // every lane has read
  return r;
}
template <class T> void gpuAtomicAdd(T* p, T v) { std::atomic_ref<T>(*p).fetch_add(v); }
using std::floor;
namespace c10::cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; }
namespace at::cuda { inline int getCurrentCUDAStream() { return 0; } }
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)
template <class Kernel, class... Args>
void emulate_launch(Kernel kernel, long long blocks, int threads, Args... args) {
  constexpr size_t stack = 1 << 18;
  static std::vector<char> stacks(32 * stack);
  emu_body = [&] { kernel(args...); };
  for (long long b = 0; b < blocks; ++b) {
    for (int w = 0; w < threads / 32; ++w) {
      for (int lane = 0; lane < 32; ++lane) {
        getcontext(&emu_lanes[lane]);
        emu_lanes[lane].uc_stack.ss_sp = stacks.data() + lane * stack;
        emu_lanes[lane].uc_stack.ss_size = stack;
        emu_lanes[lane].uc_link = &emu_scheduler;
        makecontext(&emu_lanes[lane], emu_entry, 0);
        emu_done[lane] = false;
      }
      for (int running = 32; running > 0;) {  // one round: every live lane runs to its next shuffle or its end
        int waiting = 0;
        for (int lane = 0; lane < 32; ++lane) {
          if (emu_done[lane]) continue;
          blockIdx.x = b;
          threadIdx.x = w * 32 + lane;
          emu_lane = lane;
          swapcontext(&emu_scheduler, &emu_lanes[lane]);
          if (emu_done[lane]) --running; else ++waiting;
        }
        TORCH_CHECK(waiting == 0 || waiting == 32, "block ", b, " warp ", w, ": a shuffle reached by ", waiting,
                    " of the 32 lanes");
      }
    }
  }
}
"""


def _host_toolchain_available():
    from torch.utils.cpp_extension import is_ninja_available
    return shutil.which('c++') is not None and is_ninja_available()


@pytest.fixture(scope='module')
def host_kernels(tmp_path_factory):
    import re
    from torch.utils.cpp_extension import load
    build = tmp_path_factory.mktemp('msda_host_emulation')
    source = (REPO / 'ops' / 'src' / 'ms_deform_attn_cuda.cu').read_text()
    source = re.sub(r'#include <(ATen/cuda/Atomic\.cuh|c10/cuda/[^>]+)>\n', '', source)
    source, launches = re.subn(r'(\w+<scalar_t>)<<<([^,]+), (\w+), 0, stream>>>\(', r'emulate_launch(\1, \2, \3, ',
                               source)
    assert launches == 2, 'expected one forward and one backward kernel launch'
    (build / 'host_shim.h').write_text(HOST_SHIM)
    (build / 'msda_host_emulation.cpp').write_text(
        '#include <torch/extension.h>\n#include "host_shim.h"\n' + source +
        '\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n'
        '  m.def("forward", &ms_deform_attn_cuda_forward);\n'
        '  m.def("backward", &ms_deform_attn_cuda_backward);\n}\n')
    return load('msda_host_emulation', [str(build / 'msda_host_emulation.cpp')],
                extra_include_paths=[str(build), str(REPO / 'ops' / 'src')], extra_cflags=['-O1', '-std=c++20'],
                build_directory=str(build), with_cuda=False)


@pytest.mark.skipif(not _host_toolchain_available(), reason='needs a C++ compiler and ninja')
@pytest.mark.parametrize('dtype, shapes, N, M, D, P, Q, im2col_step', [
    (torch.float64, [(6, 6), (3, 3), (2, 2), (1, 1)], 2, 2, 32, 4, 9, 64),   # D = 32: one warp per head
    (torch.float64, [(7, 5), (1, 1), (3, 11)], 3, 3, 48, 3, 5, 2),           # 16-lane segments + atomics, chunks
    (torch.float64, [(9, 9), (4, 4)], 2, 2, 64, 2, 4, 64),                   # two warps per head
    (torch.float64, [(5, 4), (2, 3)], 2, 2, 3, 2, 5, 1),                     # D = 3: per-lane atomics
    (torch.float32, [(7, 5), (1, 1), (3, 11)], 3, 3, 48, 3, 5, 2),
    (torch.bfloat16, [(6, 6), (3, 3), (2, 2), (1, 1)], 2, 2, 32, 4, 9, 64),
    (torch.float16, [(6, 6), (3, 3), (2, 2), (1, 1)], 2, 2, 32, 4, 9, 64),
])
def test_cuda_kernel_source_matches_pytorch_path_on_host(host_kernels, dtype, shapes, N, M, D, P, Q, im2col_step):
    value, spatial_shapes, starts, locations, weights = make_inputs(
        shapes, N=N, Q=Q, M=M, D=D, P=P, loc_range=(-0.3, 1.3), dtype=torch.float64, seed=7)
    upstream = torch.randn(N, Q, M * D, dtype=torch.float64)
    inputs = [t.to(dtype).contiguous() for t in (value, locations, weights)]
    reference_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.to(reference_dtype).requires_grad_() for t in inputs]
    expected = ops.ms_deform_attn(leaves[0], spatial_shapes, starts, leaves[1], leaves[2])
    expected.backward(upstream.to(dtype).to(reference_dtype))

    out = host_kernels.forward(inputs[0], spatial_shapes, starts, inputs[1], inputs[2], im2col_step)
    grads = host_kernels.backward(inputs[0], spatial_shapes, starts, inputs[1], inputs[2],
                                  upstream.to(dtype).contiguous(), im2col_step)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    for name, got, want in zip(('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights'),
                               [out] + list(grads), [expected] + [t.grad for t in leaves]):
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.to(reference_dtype), want, rtol=0, atol=tolerance * scale,
                                   msg=lambda message, name=name: f'{name}: {message}')


# ----------------------------------------------------------------------------------------------------------
# bench scripts (tiny sizes, CPU): they must keep running for the GPU session that uses them

def _load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_bench_{name}', REPO / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_msda_runs_on_cpu(capsys):
    bench = _load_script('bench_msda')
    bench.main(['--device', 'cpu', '--img-size', '64', '--repeats', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    assert 'pytorch  forward' in out and 'CUDA kernel not timed' in out
    import utils
    with pytest.raises(utils.InputError, match='multiple of 32'):
        bench.main(['--img-size', '100'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU the script builds and runs the kernel: run it directly')
def test_gpu_check_cpu_smoke_writes_json(tmp_path, capsys):
    import json
    check = _load_script('gpu_check')
    check.main(['--cpu-smoke', '--skip-train', '--json', str(tmp_path / 'figures.json')])
    figures = json.loads((tmp_path / 'figures.json').read_text())
    assert figures['mode'] == 'cpu-smoke' and not figures['errors'] and figures['check']['all_pass']
    assert figures['speed']['float32']['pytorch']['forward_ms'] > 0
    profile = figures['profile']
    assert profile['wall_ms_per_step'] > 0 and profile['aten_calls_per_step'] > 100 and profile['top']
    assert 'gpu_check: total_seconds' in capsys.readouterr().out
