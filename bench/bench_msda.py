"""Speed of multi-scale deformable attention: the CUDA kernel against the PyTorch path.

    python bench/bench_msda.py                       # 480-px pyramid, batch 2, 8 heads, 4 points
    python bench/bench_msda.py --device cpu --repeats 3

The pyramid is that of a 480-px image at strides 4/8/16/32 (120x120, 60x60, 30x30, 15x15 = 19,125
tokens), every token a query (encoder self-attention), d_model 256. Prints forward and
forward+backward times per backend and the PyTorch / kernel ratio. On a machine without CUDA only the
PyTorch path is timed.
"""
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import utils  # noqa: E402

DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'float16': torch.float16,
          'bfloat16': torch.bfloat16}
STRIDES = (4, 8, 16, 32)


def pyramid_shapes(img_size, strides=STRIDES):
    return [(img_size // s, img_size // s) for s in strides]


def make_inputs(shapes, batch=2, d_model=256, n_heads=8, n_points=4, num_queries=None, device='cpu',
                dtype=torch.float32, seed=0):
    """Realistic operator inputs: queries at pixel centres, offsets of a few pixels, softmax weights."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    Q = S if num_queries is None else num_queries
    D = d_model // n_heads
    value = torch.randn(batch, S, n_heads, D, generator=g)
    centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                                    indexing='ij')[::-1], -1).view(-1, 2) for h, w in shapes])
    centres = centres[torch.randint(0, S, (Q,), generator=g)] if Q != S else centres          # [Q, 2]
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)                      # [L, 2]
    offsets = 2.0 * torch.randn(batch, Q, n_heads, L, n_points, 2, generator=g) / size[:, None, :]
    locations = centres[None, :, None, None, None, :] + offsets                                # [N, Q, M, L, P, 2]
    weights = torch.randn(batch, Q, n_heads, L * n_points, generator=g).softmax(-1).view(batch, Q, n_heads, L, n_points)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = [h * w for h, w in shapes]
    level_start_index = torch.tensor([sum(sizes[:i]) for i in range(L)], dtype=torch.long)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), spatial_shapes.to(device), level_start_index.to(device), locations.to(**to),
            weights.to(**to))


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup=2, repeats=10):
    """Median wall time of fn() in milliseconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_backend(backend, inputs, warmup=2, repeats=10, im2col_step=64):
    """{'forward_ms', 'forward_backward_ms'} of ops.ms_deform_attn with this backend."""
    import ops
    value, spatial_shapes, level_start_index, locations, weights = inputs
    device = value.device
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]

    def forward():
        with torch.no_grad():
            return ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, im2col_step,
                                      backend=backend)

    grad = torch.randn_like(forward())

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = ops.ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], im2col_step,
                                 backend=backend)
        out.backward(grad)

    return {'forward_ms': time_ms(forward, device, warmup, repeats),
            'forward_backward_ms': time_ms(forward_backward, device, warmup, repeats)}


def kernel_available(device):
    import ops
    return torch.device(device).type == 'cuda' and ops.get_extension() is not None


def run_speed_comparison(img_size=480, batch=2, d_model=256, n_heads=8, n_points=4, device='cpu',
                         dtype=torch.float32, warmup=2, repeats=10, log=print):
    """Times both backends (the kernel only on CUDA); returns a dict of figures and logs one line each."""
    shapes = pyramid_shapes(img_size)
    inputs = make_inputs(shapes, batch, d_model, n_heads, n_points, device=device, dtype=dtype)
    tag = f'{img_size}px levels={shapes} batch={batch} heads={n_heads} points={n_points} ' \
          f'd_model={d_model} queries={inputs[3].shape[1]} {str(dtype).replace("torch.", "")} on {device}'
    log(f'msda bench: {tag}')
    figures = {'config': tag}
    backends = ['pytorch'] + (['cuda'] if kernel_available(device) else [])
    for backend in backends:
        result = bench_backend(backend, inputs, warmup, repeats)
        figures[backend] = result
        log(f'msda bench: {backend:8s} forward {result["forward_ms"]:9.2f} ms   '
            f'forward+backward {result["forward_backward_ms"]:9.2f} ms')
    if 'cuda' in figures:
        for key in ('forward_ms', 'forward_backward_ms'):
            ratio = figures['pytorch'][key] / figures['cuda'][key]
            figures[f'ratio_{key[:-3]}'] = ratio
            log(f'msda bench: ratio pytorch/kernel {key[:-3]:17s} {ratio:6.2f}x')
    else:
        log('msda bench: CUDA kernel not timed (it needs a GPU and the built extension: bench/gpu_check.py)')
    return figures


def get_args_parser():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda or cuda:N')
    parser.add_argument('--img-size', type=int, default=480, help='image side; levels at strides 4/8/16/32')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--d-model', type=int, default=256)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--points', type=int, default=4)
    parser.add_argument('--dtype', default='float32', choices=sorted(DTYPES))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.img_size < 32 or args.img_size % 32:
        raise utils.InputError(f'--img-size must be a positive multiple of 32, got {args.img_size}')
    for flag in ('batch', 'heads', 'points', 'repeats'):
        if getattr(args, flag) < 1:
            raise utils.InputError(f'--{flag} must be at least 1')
    if args.d_model % args.heads:
        raise utils.InputError(f'--d-model {args.d_model} must be divisible by --heads {args.heads}')
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise utils.InputError(f'--device {args.device}: CUDA is not available on this machine')
    if torch.device(device).type == 'cpu':
        print(f'msda bench: CPU run with {torch.get_num_threads()} threads; the CUDA kernel needs a GPU')
    run_speed_comparison(args.img_size, args.batch, args.d_model, args.heads, args.points, device,
                         DTYPES[args.dtype], args.warmup, args.repeats)


if __name__ == '__main__':
    utils.run_cli(main)
