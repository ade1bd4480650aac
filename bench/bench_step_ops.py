"""Dispatched operators and host time per training step: eager stages 1, 2 and 3 with AdamW's per-parameter
loop (foreach=False) against its multi-tensor path (foreach=True, the default of build_optimizer), and
each stage compiled as one graph (--compile BACKEND).

    .venv/bin/python bench/bench_step_ops.py --swin_type nano --img_size 64 -b 2 --bert_layers 2
    .venv/bin/python bench/bench_step_ops.py --swin_type nano --img_size 64 -b 2 --bert_layers 2 --compile
    python bench/bench_step_ops.py --device cuda --swin_type base --img_size 480 -b 8 --window12 --compile

Every operator a step hands to PyTorch's dispatcher costs host time (and on a GPU at least one kernel
launch): a step whose count is high is bound by the host. Counted with torch.profiler over --iters real
steps (engine.train_one_epoch with the stage's hooks, on bench_lrb's stand-in batch and bank):
- `ops`: aten operators called from Python or autograd (top-level: one per dispatch from the step's code);
- `nested`: all aten operators, those called inside another one included (a composite op's parts);
- `optimizer`: the top-level ones inside the optimizers' step() (AdamW of the model; the bank's in
  stages 2 and 3).
Time: ms per step without the profiler, the fastest of --rounds alternating rounds; on a GPU also the host's
share (time until the last step was enqueued, before the final synchronisation).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402
from bench import bench_lrb  # noqa: E402


def get_args(argv=None):
    parser = bench_lrb.build_parser()  # bench_train's flags and the bank's (--bank_refs, --weak_share, --rounds)
    parser.description = 'dispatched operators and host time per training step'
    parser.add_argument('--stages', default='stage1,stage2,stage3', help='eager stages to measure')
    parser.set_defaults(iters=3, warmup=1, swin_type='nano', img_size=64, batch_size=2)
    return parser.parse_args(argv)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def count_ops(run, steps):
    """Per step: {'ops': top-level aten ops, 'nested': all aten ops, 'optimizer': top-level ones in step()}."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    top = nested = in_optimizer = 0
    for event in prof.events():
        if not event.name.startswith('aten::'):
            continue
        nested += 1
        inner = optimizer = False
        parent = event.cpu_parent
        while parent is not None:
            inner = inner or parent.name.startswith('aten::')
            optimizer = optimizer or parent.name.startswith('Optimizer.step')
            parent = parent.cpu_parent
        if not inner:
            top += 1
            in_optimizer += optimizer
    return {'ops': top / steps, 'nested': nested / steps, 'optimizer': in_optimizer / steps}


def time_ms(run, steps, device):
    """-> (wall ms per step, host ms per step: until the last step was enqueued)."""
    _sync(device)
    start = time.perf_counter()
    run()
    host = time.perf_counter() - start
    _sync(device)
    wall = time.perf_counter() - start
    return 1000 * wall / steps, 1000 * host / steps


def set_foreach(optimizers, foreach):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['foreach'] = foreach


def measure(args):
    """-> {variant name: {'ops', 'nested', 'optimizer', 'wall_ms', 'host_ms'}}; variants 'stageK foreach=B'
    and, with --compile, 'stageK compiled'."""
    compile_backend, args.compile = args.compile, ''
    stages = bench_lrb.build_stages(args)  # eager
    device, n = stages.device, stages.n
    variants = {}
    for name in args.stages.split(','):
        for foreach in (False, True):
            def run(name=name, foreach=foreach):
                set_foreach(stages.optimizers, foreach)
                stages.variants[name]()
            variants[f'{name} foreach={foreach}'] = run
    if compile_backend:  # each stage's step compiled as one graph (the multi-tensor AdamW of the default)
        args.compile = compile_backend
        compiled = bench_lrb.build_stages(args)
        for name in args.stages.split(','):
            variants[f'{name} compiled'] = compiled.variants[name]
    results = {}
    for name, run in variants.items():
        start = time.perf_counter()
        run()  # warm-up: optimizer state, the compile
        print(f'{name}: warm-up {time.perf_counter() - start:.1f} s', flush=True)
        results[name] = count_ops(run, n)
        results[name]['wall_ms'] = results[name]['host_ms'] = float('inf')
    for _ in range(args.rounds):
        for name, run in variants.items():
            wall, host = time_ms(run, n, device)
            if wall < results[name]['wall_ms']:
                results[name]['wall_ms'], results[name]['host_ms'] = wall, host
    return results


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    results = measure(args)
    print(f'swin {args.swin_type} img {args.img_size} batch {args.batch_size} bert {args.bert_hidden}x'
          f'{args.bert_layers} amp {args.amp} on {args.device} ({torch.get_num_threads()} threads); per step:')
    cuda = args.device.startswith('cuda')
    for name, r in results.items():
        host = f' (host {r["host_ms"]:.1f})' if cuda else ''
        print(f'{name:22s} {r["ops"]:7.0f} ops ({r["optimizer"]:5.0f} in optimizer step) {r["nested"]:7.0f} nested '
              f'| {r["wall_ms"]:7.1f} ms{host}')


if __name__ == '__main__':
    utils.run_cli(main)
