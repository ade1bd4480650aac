"""Where a training step's time goes: torch.profiler over a few real engine steps, top operators.

    python bench/profile_step.py --device cuda --swin_type base --img_size 480 -b 8 --window12 [--amp]
    .venv/bin/python bench/profile_step.py --device cpu --swin_type nano --img_size 64 -b 2 --bert_layers 2

Prints the --top operators by self time on the device (GPU kernels, or CPU time on a CPU), with their
share of the step, so that a slow precision or option can be traced to the operators that cost it.
On a GPU it also says whether the step is bound by the host: wall time per step (without the profiler)
against the time the GPU spends in kernels, and the kernel launches and aten calls per step.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402
from bench import bench_train  # noqa: E402
from lib.model.build import text_encoder_of  # noqa: E402
from lib.training import distributed, engine  # noqa: E402
from lib.training.losses import build_criterion  # noqa: E402
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized  # noqa: E402


def get_args(argv=None):
    parser = bench_train.build_parser()
    parser.description = 'top operators of a training step'
    parser.add_argument('--top', default=15, type=int, help='operators to list')
    parser.set_defaults(iters=3, warmup=2)
    return parser.parse_args(argv)


LAUNCHES = ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx')


def profile(args):
    """-> (rows [(name, self ms per step, share)], ms per step on the device, summary {wall_ms_per_step,
    device_busy_ms_per_step, kernel_launches_per_step, aten_calls_per_step})."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    env = distributed.init_distributed(args.device)
    distributed.seed_everything(args.seed)
    device = env.device
    model, bert = bench_train.build(args, device)
    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    optimizer = build_optimizer(groups, args)
    scheduler = build_poly_scheduler(optimizer, 10 ** 6)
    text = text_encoder_of(model, bert)
    batch = bench_train.synthetic_batch(args.batch_size, args.img_size, text.config.vocab_size)
    step = engine.supervised_step(model, bert, build_criterion().to(device))
    model.train()

    def run(n):
        engine.train_one_epoch(step, [batch] * n, optimizer, scheduler, 0, device=device, print_freq=10 ** 9,
                               amp=args.amp)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    run(args.warmup)
    start = time.perf_counter()
    run(args.iters)
    wall = (time.perf_counter() - start) * 1000 / args.iters  # without the profiler's own overhead
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run(args.iters)
    averages = prof.key_averages()
    attr = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    events = [e for e in averages if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) / 1000 / args.iters  # ms per step
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [(e.key, getattr(e, attr) / 1000 / args.iters, getattr(e, attr) / 1000 / args.iters / total)
            for e in events[:args.top]]
    summary = {'wall_ms_per_step': wall, 'device_busy_ms_per_step': total if cuda else None,
               'kernel_launches_per_step': sum(e.count for e in averages if e.key in LAUNCHES) / args.iters
               if cuda else None,
               'aten_calls_per_step': sum(e.count for e in averages if e.key.startswith('aten::')) / args.iters}
    return rows, total, summary


def summary_line(summary):
    line = f'{summary["wall_ms_per_step"]:.1f} ms per step (wall, without the profiler)'
    if summary['device_busy_ms_per_step'] is not None:
        busy = summary['device_busy_ms_per_step']
        line += (f'; GPU in kernels {busy:.1f} ms ({100 * busy / summary["wall_ms_per_step"]:.0f} %: below 100 % '
                 f'the host sets the pace); {summary["kernel_launches_per_step"]:.0f} kernel launches')
    return line + f'; {summary["aten_calls_per_step"]:.0f} aten calls (nested ones included)'


def main(argv=None):
    args = get_args(argv)
    rows, total, summary = profile(args)
    print(f'swin {args.swin_type} img {args.img_size} batch {args.batch_size} amp {args.amp}: '
          f'{total:.1f} ms of {"GPU" if args.device.startswith("cuda") else "CPU"} self time per step')
    print(summary_line(summary))
    for name, ms, share in rows:
        print(f'{ms:9.2f} ms {100 * share:5.1f} %  {name[:90]}')


if __name__ == '__main__':
    utils.run_cli(main)
