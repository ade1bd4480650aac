"""One prepared GPU session: build the deformable-attention kernels, check them against the PyTorch path,
time both, and time a training step of the full model. Finishes in a few minutes.

    python bench/gpu_check.py                  # on a GPU machine; writes $OUT/gpu_check.json if OUT is set
    python bench/gpu_check.py --cpu-smoke      # tiny sizes on CPU: exercises every section's code path
    python bench/gpu_check.py --original_dir .original   # + our training iteration against the original's

`steps` (issue 21) first checks the train loader's uint8 items finished on the GPU against the CPU's and the
--cuda_graphs updates of all three stages against the eager ones, then
times each stage eager, with --cuda_graphs and with --compile --cuda_graphs at batch 8 and 2 (bf16, Swin-B
480), with stage 1's MFU.

The speed sections (bench/compare_original.py, bench/bench_loader.py): `compare` times the original's
training iteration and ours (fp32, bf16, each speed option) alternating at the paper's config (Swin-B,
480 px, batch 2) and a throughput one (batch 8), then --compile and CUDA graphs at batch 8 while the time
budget allows; `memory` runs the paper's config with and without --checkpoint_activations (and DDP) under
the allocator cap of a 12 GB card; `sync` counts host synchronisations per iteration; `profile` says
whether the batch-8 bf16 step is bound by the host (wall time against GPU time in kernels, launches per
step); `loader` times the train DataLoader with the paper's 2 workers per process.

Every figure is printed as one line `gpu_check: <section> <name>: <value>`; every section runs in its own
try/except, so one failure is printed and the rest still runs.
"""
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from unittest import mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import utils  # noqa: E402

PREFIX = 'gpu_check:'


def log(line):
    print(f'{PREFIX} {line}', flush=True)


class Report:
    """Collects figures (nested dicts) and section errors; runs sections without letting one stop the rest."""

    def __init__(self, time_budget_s):
        self.figures = {'errors': {}, 'skipped': {}}
        self.start = time.perf_counter()
        self.time_budget_s = time_budget_s

    def elapsed(self):
        return time.perf_counter() - self.start

    def over_budget(self):
        return self.elapsed() > self.time_budget_s

    def run(self, name, fn, *args, **kwargs):
        if self.over_budget():
            self.skip(name, f'time budget of {self.time_budget_s:.0f} s used up')
            return None
        section_start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            if result is not None:
                self.figures[name] = result
            return result
        except Exception as e:  # keep going: every later section may still give figures
            self.figures['errors'][name] = f'{type(e).__name__}: {e}'
            log(f'{name} FAILED: {type(e).__name__}: {e}')
            traceback.print_exc(limit=4)
            return None
        finally:
            log(f'{name} section_seconds: {time.perf_counter() - section_start:.1f}')

    def skip(self, name, why):
        self.figures['skipped'][name] = why
        log(f'{name} skipped: {why}')


# ----------------------------------------------------------------------------------------------------------
# sections

def environment():
    info = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'python': sys.version.split()[0],
            'cuda_available': torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability='%d.%d' % (props.major, props.minor),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    for key, value in info.items():
        log(f'env {key}: {value}')
    return info


def build_extension(build_dir):
    import ops
    major, minor = torch.cuda.get_device_capability(0)
    arch = f'{major}.{minor}'
    start = time.perf_counter()
    module = ops.load_extension(verbose=False, build_dir=build_dir, arch_list=arch)
    seconds = time.perf_counter() - start
    # make the dispatcher use this build
    from ops.functions import extension
    extension._cache.update(module=module, tried=True)
    log(f'build arch: {arch}')
    log(f'build compile_seconds: {seconds:.1f}')
    log(f'build module: {module.__file__}')
    return {'arch': arch, 'compile_seconds': round(seconds, 1), 'module': module.__file__}


def _max_abs(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare_backends(name, shapes, batch, n_heads, head_dim, n_points, num_queries=None, outside=False,
                     im2col_step=64, dtype=torch.float32, reference_dtype=None, device='cuda', tolerance=1e-4,
                     kernel_backend='cuda'):
    """Kernel vs PyTorch path: max |difference| of the output and of the three gradients.

    The PyTorch path runs in reference_dtype (default: dtype). PASS when every max difference is below
    tolerance times the largest reference magnitude of that tensor.
    """
    import bench_msda
    import ops
    inputs = bench_msda.make_inputs(shapes, batch, n_heads * head_dim, n_heads, n_points, num_queries,
                                    device=device, dtype=torch.float64, seed=1)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    if outside:  # stretch around the centre: many samples partly or wholly outside [0, 1]
        locations = (locations - 0.5) * 1.8 + 0.5
    grad = torch.randn(batch, locations.shape[1], n_heads * head_dim, device=device, dtype=torch.float64)

    def run(backend, run_dtype):
        # both backends see the same values: rounded to dtype first, then carried in run_dtype
        leaves = [t.to(dtype).to(run_dtype).detach().requires_grad_() for t in (value, locations, weights)]
        out = ops.ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], im2col_step,
                                 backend=backend)
        out.backward(grad.to(dtype).to(run_dtype))
        return [out.detach()] + [t.grad for t in leaves]

    kernel = run(kernel_backend, dtype)
    reference = run('pytorch', reference_dtype or dtype)
    result = {'dtype': str(dtype).replace('torch.', ''),
              'reference_dtype': str(reference_dtype or dtype).replace('torch.', ''),
              'shapes': shapes, 'batch': batch, 'heads': n_heads, 'head_dim': head_dim, 'points': n_points,
              'queries': locations.shape[1], 'im2col_step': im2col_step}
    passed = True
    for key, k, r in zip(('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights'),
                         kernel, reference):
        diff = _max_abs(k, r)
        scale = r.double().abs().max().item() or 1.0
        over = int(((k.double() - r.double()).abs() > tolerance * scale).sum().item())
        result[f'max_abs_diff_{key}'] = diff
        result[f'max_abs_{key}'] = scale
        result[f'num_over_tolerance_{key}'] = over
        # d(output)/d(location) jumps where a sample crosses a pixel edge: the two backends round the pixel
        # coordinate differently (x*W-0.5 vs grid_sample's ((2x-1+1)*W-1)/2), so a handful may differ
        allowed = max(2, int(1e-5 * r.numel())) if key == 'grad_sampling_locations' else 0
        passed &= over <= allowed
    result['pass'] = bool(passed)
    log(f'check {name} [{result["dtype"]} vs pytorch {result["reference_dtype"]}]: '
        + ' '.join(f'{key}={result["max_abs_diff_" + key]:.3e}(of {result["max_abs_" + key]:.2e}, '
                   f'{result["num_over_tolerance_" + key]} over)'
                   for key in ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights'))
        + f' -> {"PASS" if passed else "FAIL"}')
    return result


def correctness_checks(smoke, device='cuda'):
    """Kernel vs PyTorch path on several cases. On CPU (--cpu-smoke) both sides are the PyTorch path: that
    only exercises this code."""
    size = 64 if smoke else 480
    pyramid = [(size // s, size // s) for s in (4, 8, 16, 32)]
    results = {}
    cases = {
        # realistic: the 480-px encoder case, every token a query
        'realistic': dict(shapes=pyramid, batch=2, n_heads=8, head_dim=32, n_points=4),
        # corners: 1x1 and non-square levels, locations outside, D=48 (atomic reduction path),
        # im2col_step that does not divide the batch
        'corner': dict(shapes=[(7, 5), (1, 1), (3, 11)], batch=3, n_heads=3, head_dim=48, n_points=3,
                       num_queries=50, outside=True, im2col_step=2),
        'corner_d64': dict(shapes=[(9, 9), (4, 4)], batch=2, n_heads=2, head_dim=64, n_points=2, num_queries=40,
                           outside=True),
        'corner_d8_one_level': dict(shapes=[(6, 13)], batch=1, n_heads=4, head_dim=8, n_points=5, num_queries=33,
                                    outside=True),
        'float64': dict(shapes=[(7, 5), (1, 1), (3, 11)], batch=2, n_heads=2, head_dim=16, n_points=2,
                        num_queries=30, outside=True, dtype=torch.float64, tolerance=1e-10),
        'bfloat16': dict(shapes=pyramid, batch=2, n_heads=8, head_dim=32, n_points=4, num_queries=2000,
                         dtype=torch.bfloat16, reference_dtype=torch.float32, tolerance=5e-2),
        'float16': dict(shapes=pyramid, batch=2, n_heads=8, head_dim=32, n_points=4, num_queries=2000,
                        dtype=torch.float16, reference_dtype=torch.float32, tolerance=1e-2),
    }
    failures = []
    for name, case in cases.items():
        try:
            results[name] = compare_backends(name, device=device, kernel_backend='cuda' if device == 'cuda'
                                             else 'pytorch', **case)
            if not results[name]['pass']:
                failures.append(name)
        except Exception as e:
            results[name] = {'error': f'{type(e).__name__}: {e}'}
            failures.append(name)
            log(f'check {name} FAILED: {type(e).__name__}: {e}')
            traceback.print_exc(limit=4)
    results['all_pass'] = not failures
    log(f'check all_pass: {not failures}' + (f' (failed: {", ".join(failures)})' if failures else ''))
    return results


def speed(smoke, device):
    import bench_msda
    figures = {}
    for dtype in (torch.float32, torch.bfloat16) if device == 'cuda' else (torch.float32,):
        key = str(dtype).replace('torch.', '')
        figures[key] = bench_msda.run_speed_comparison(
            img_size=64 if smoke else 480, batch=2, device=device, dtype=dtype,
            warmup=1 if smoke else 3, repeats=2 if smoke else 20, log=lambda line: log(line.replace(': ', ' ', 1)))
    return figures


def _train_case(device, cross_scale, precision, batch, img_size, swin_type, steps, warmup,
                force_pytorch_msda=False, bert_shape=(768, 12)):
    """One configuration of bench_train.measure: the real engine step (BERT-base-shaped random BERT,
    the reference loss, parameter groups and schedule) on a synthetic batch."""
    import bench_train
    argv = ['--device', device, '--swin_type', swin_type, '--img_size', str(img_size), '--window12',
            '--cross_scale', cross_scale, '-b', str(batch), '--iters', str(steps), '--warmup', str(warmup),
            '--bert_hidden', str(bert_shape[0]), '--bert_layers', str(bert_shape[1])]
    if precision == 'bf16':
        argv.append('--amp')
    env = {'LRB_MSDA_FORCE_PYTORCH': '1'} if force_pytorch_msda else {}
    with mock.patch.dict(os.environ, env):
        result = bench_train.measure(bench_train.get_args(argv))
    peak = result['peak_memory_mib'] / 1024 if device == 'cuda' else None
    return {'it_per_s': result['it_per_s'], 'images_per_s': result['samples_per_s'], 'peak_memory_gib': peak,
            'batch': batch, 'steps': steps}


def training(report, smoke, device):
    """Training-step speed of lavt (Swin-B, 480 px) for each cross-scale module and precision."""
    try:
        import lib.model.segmentation  # noqa: F401
    except Exception as e:
        report.skip('train', f'lib.model.segmentation not importable ({type(e).__name__}: {e})')
        return None
    img_size, swin_type = (64, 'nano') if smoke else (480, 'base')
    steps, warmup = (1, 1) if smoke else (10, 3)
    batches = (2,) if smoke else (8, 2)
    configs = [('faithful', 'fp32', False), ('msda', 'fp32', False), ('faithful', 'bf16', False),
               ('msda', 'bf16', False), ('msda', 'bf16', True)]
    figures = {}
    for cross_scale, precision, force_pytorch in configs:
        name = f'{cross_scale}{"_pytorch_path" if force_pytorch else ""}_{precision}'
        if report.over_budget():
            report.skip(f'train {name}', 'time budget used up')
            continue
        for batch in batches:
            out_of_memory = False
            try:
                result = _train_case(device, cross_scale, precision, batch, img_size, swin_type, steps, warmup,
                                     force_pytorch_msda=force_pytorch, bert_shape=(64, 2) if smoke else (768, 12))
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            except Exception as e:
                figures[name] = {'error': f'{type(e).__name__}: {e}'}
                log(f'train {name} FAILED: {type(e).__name__}: {e}')
                traceback.print_exc(limit=4)
                break
            if out_of_memory:  # outside the except block, so the failed step's tensors are free
                log(f'train {name} batch {batch}: out of memory, trying a smaller batch')
                gc.collect()
                torch.cuda.empty_cache()
                continue
            figures[name] = result
            log(f'train {name} swin-{swin_type} {img_size}px batch {batch}: {result["it_per_s"]:.2f} it/s, '
                f'{result["images_per_s"]:.1f} img/s, peak memory '
                + (f'{result["peak_memory_gib"]:.2f} GiB' if result['peak_memory_gib'] is not None else 'n/a (CPU)'))
            break
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return figures


def lrb_stages(smoke, device):
    """Stage-2 and stage-3 iterations (lib/training/lrb hooks in the real engine loop) against a stage-1 step at the
    same batch, fp32 and bf16, with a bank of RRSIS-D's 10 % size (11,000 refs x 20 x 768)."""
    import bench_lrb
    figures = {}
    for precision in ('fp32',) if smoke else ('fp32', 'bf16'):
        argv = ['--device', device, '--swin_type', 'nano' if smoke else 'base', '--img_size', '64' if smoke else '480',
                '--window12', '-b', '2' if smoke else '8', '--iters', '1' if smoke else '5', '--warmup', '1',
                '--bank_refs', '50' if smoke else '11000', '--rounds', '1' if smoke else '2']
        if smoke:
            argv += ['--bert_hidden', '64', '--bert_layers', '2']
        if precision == 'bf16':
            argv.append('--amp')
        r = bench_lrb.measure(bench_lrb.get_args(argv))
        figures[precision] = r
        log(f'lrb {precision} batch {r["batch"]}: stage1 {r["stage1_ms"]:.1f} ms/it, stage2 {r["stage2_ms"]:.1f} ms/it '
            f'(x{r["stage2_over_stage1"]:.2f}), stage3 {r["stage3_ms"]:.1f} ms/it (x{r["stage3_over_stage1"]:.2f}), '
            f'fill {r["fill_ms"]:.3f} ms ({100 * r["fill_share_of_stage3"]:.2f} % of stage 3), '
            f'peak {r["peak_memory_mib"] / 1024:.2f} GiB')
        if device == 'cuda':
            gc.collect()
            torch.cuda.empty_cache()
    return figures


STEP_VARIANTS = (('eager', []), ('cuda_graphs', ['--cuda_graphs']),
                 ('compile+cuda_graphs', ['--compile', '--cuda_graphs']))
COMPILE_MIN_S = 150  # a compiled variant starts only with this much of the time budget left (Swin-B compiles)


def stage1_flops(argv):
    """FLOPs of one stage-1 forward + backward at the configuration of `argv` (bench_train's flags)."""
    import bench_train
    from torch.utils.flop_counter import FlopCounterMode
    args = bench_train.get_args(argv)
    step, optimizer, _, batch, _ = bench_train.build_training(args, torch.device(args.device))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=args.amp and args.device == 'cuda'):
            loss = step(batch)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_variants(report, smoke, device):
    """Issue 21: the three stages' iterations (bench_lrb: the real stage code in the engine loop) eager, with
    --cuda_graphs and with --compile --cuda_graphs, at batch 8 and the paper's batch 2, bf16, Swin-B 480, a
    bank of RRSIS-D's 10 % size; it/s and stage 1's MFU. First the graphed updates against the eager ones
    (tests/test_step_graphs.py's GPU test, every stage)."""
    import bench_lrb
    from compare_original import device_peak_tflops
    from refer.transforms import finish_batch
    figures = {'equal_to_eager': {}, 'runs': {}}
    # the train loader's uint8 items finished on this device: the CPU's float32 tensors, bit for bit
    items = {'image': torch.randint(0, 256, (8, 3, 480, 480), dtype=torch.uint8),
             'target': torch.randint(0, 2, (8, 480, 480), dtype=torch.uint8)}
    on_cpu = finish_batch(dict(items))
    on_device = finish_batch({k: v.to(device) for k, v in items.items()})
    figures['uint8_items_equal'] = all(torch.equal(on_cpu[k], on_device[k].cpu()) for k in items)
    log(f'steps uint8 items finished on {device} equal the CPU\'s: {figures["uint8_items_equal"]}')
    if device == 'cuda':
        sys.path.insert(0, str(REPO / 'tests'))
        import test_step_graphs
        for stage in ('stage1', 'stage2', 'stage3'):
            try:
                test_step_graphs.test_cuda_graph_updates_equal_the_eager_ones(stage)
                figures['equal_to_eager'][stage] = 'PASS'
            except AssertionError as e:
                figures['equal_to_eager'][stage] = f'FAIL: {e}'
            log(f'steps graphed {stage} equals eager: {figures["equal_to_eager"][stage]}')
    peak_bf16 = device_peak_tflops(torch.device(device))[0] if device == 'cuda' else None
    for batch in ((2,) if smoke else (8, 2)):
        config = ['--device', device, '--swin_type', 'nano' if smoke else 'base', '--img_size', '64' if smoke else '480',
                  '--window12', '-b', str(batch)] + (['--bert_hidden', '64', '--bert_layers', '2'] if smoke else [])
        config += [] if smoke else ['--amp']
        flops = stage1_flops(config)
        for name, flags in STEP_VARIANTS:
            if device != 'cuda' and 'cuda_graphs' in name:
                continue
            if 'compile' in name and report.time_budget_s - report.elapsed() < COMPILE_MIN_S:
                report.skip(f'steps batch {batch} {name}', 'time budget used up')
                continue
            argv = config + flags + ['--iters', '1' if smoke else '10', '--warmup', '4',
                                     '--bank_refs', '50' if smoke else '11000', '--rounds', '2']
            r = bench_lrb.measure(bench_lrb.get_args(argv))
            run = {f'stage{k}_it_s': 1000 / r[f'stage{k}_ms'] for k in (1, 2, 3)}
            run.update(stage3_over_stage1=r['stage3_over_stage1'], peak_memory_gib=r['peak_memory_mib'] / 1024,
                       stage1_tflops=flops * run['stage1_it_s'] / 1e12)
            if peak_bf16:
                run['stage1_mfu'] = run['stage1_tflops'] / peak_bf16
            figures['runs'][f'batch{batch} {name}'] = run
            log(f'steps batch {batch} {name}: stage1 {run["stage1_it_s"]:.2f} it/s, stage2 {run["stage2_it_s"]:.2f}, '
                f'stage3 {run["stage3_it_s"]:.2f} (stage3/stage1 time x{run["stage3_over_stage1"]:.2f}); '
                f'stage1 {run["stage1_tflops"]:.1f} TFLOP/s' + (f' = MFU {100 * run["stage1_mfu"]:.1f} %' if peak_bf16
                                                             else '') + f'; peak {run["peak_memory_gib"]:.1f} GiB')
            if device == 'cuda':
                gc.collect()
                torch.cuda.empty_cache()
    return figures


def stages_cli(device):
    """The whole method through its command lines on the GPU, small: demo data (40 images, 64 px), small BERT,
    the 90 % split, train.py (fp32) -> train_stu_base.py (fp32) -> train_stu_tea.py (--amp) -> test.py."""
    import subprocess
    work = Path(tempfile.mkdtemp(prefix='lrb_stages_'))
    py = [sys.executable]
    common = ['--device', device, '--dataset', 'rrsisd', '--swin_type', 'nano', '--img_size', '64', '--workers', '2',
              '--pretrained_swin_weights', '', '--bert_tokenizer', str(work / 'bert'), '--ck_bert', str(work / 'bert'),
              '--batch-size', '4', '--model_id', 'g', '--print-freq', '5']
    splits = work / 'splits'
    steps = [
        ('demo_data', ['-m', 'refer.demo_data', '--out', str(work / 'data'), '--images', '40', '--size', '64']),
        ('small_bert', ['-m', 'bert.build_small', '--refer_data_root', str(work / 'data'), '--dataset', 'rrsisd',
                        '--out', str(work / 'bert')]),
        ('split', ['mask_train_only.py', '--refer_data_root', str(work / 'data'), '--dataset', 'rrsisd',
                   '--output_dir', str(splits), '--ratios', '90']),
        ('stage1', ['train.py', *common, '--refer_data_root', str(splits / 'rrsisd-90-no-mask'), '--epochs', '2',
                    '--lr', '1e-3', '--output-dir', str(work / 's1')]),
        ('stage2', ['train_stu_base.py', *common, '--refer_data_root', str(splits / 'rrsisd-90-mask'), '--epochs', '2',
                    '--lr', '1e-2', '--resume', str(work / 's1' / 'model_last_g.pth'), '--output-dir', str(work / 's2')]),
        ('stage3_amp', ['train_stu_tea.py', *common, '--refer_data_root', str(splits / 'rrsisd-90-all'), '--epochs', '2',
                        '--lr', '1e-3', '--caption_lr', '1e-2', '--amp', '--resume', str(work / 's1' / 'model_last_g.pth'),
                        '--caption_embedding_path', str(work / 's2' / 'caption_embeddings_g.pt'),
                        '--output-dir', str(work / 's3')]),
        ('test', ['test.py', *common, '--refer_data_root', str(splits / 'rrsisd-90-all'), '--split', 'test',
                  '--resume', str(work / 's3' / 'model_best_oIoU_g.pth'), '--results_json', str(work / 'test.json')]),
    ]
    figures = {}
    for name, argv in steps:
        start = time.perf_counter()
        proc = subprocess.run(py + argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        figures[name] = {'rc': proc.returncode, 'seconds': round(seconds, 1)}
        log(f'stages {name}: rc {proc.returncode} in {seconds:.1f} s')
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
            figures[name]['tail'] = tail
            for line in tail:
                log(f'stages {name} | {line}')
            break
        for line in (proc.stdout + proc.stderr).splitlines():
            if 'bank steps taken' in line or 'identical on all' in line:
                log(f'stages {name} | {line.strip()}')
    if (work / 'test.json').exists():
        metrics = json.loads((work / 'test.json').read_text())
        figures['test_metrics'] = {k: metrics[k] for k in ('oIoU', 'mIoU', 'num_sentences', 'weights_key')}
        log(f'stages test metrics: {figures["test_metrics"]}')
    figures['all_ok'] = all(v.get('rc') == 0 for k, v in figures.items() if isinstance(v, dict) and 'rc' in v) \
        and len([k for k in figures if k in dict(steps)]) == len(steps)
    return figures


# ----------------------------------------------------------------------------------------------------------
# speed options against the original, memory with activation checkpointing, host syncs, data loading
# (bench/compare_original.py, bench/bench_loader.py)

SMOKE_CONFIG = dict(swin_type='tiny', img_size=64, batch=2, bert_layers=1)  # the smallest the original builds
SMOKE_CONFIG_OURS = dict(swin_type='nano', img_size=64, batch=2, bert_layers=1, bert_width=64)
# name: (config, variants, warm-up iterations, rounds, iterations per round). The compiled variant runs last,
# against its eager twin, and only while the time budget allows; its speed-up over the original is the twin's
# (paper) times its own over the twin.
COMPARE_PLAN = {
    'paper': ('paper', 'original,original_no_ddp,fp32,bf16,bf16+fused_adamw,fp32+channels_last,bf16+channels_last,'
              'bf16+cudnn_benchmark,bf16+channels_last+cudnn_benchmark,bf16+channels_last+fused_adamw,'
              'bf16+pin_mem,fp32+checkpoint', 2, 3, 2),
    'throughput': ('throughput', 'original,fp32,bf16,fp32+channels_last,bf16+channels_last,'
                   'bf16+channels_last+fused_adamw,bf16+checkpoint', 2, 2, 2),
    # the MFU target is at batch 8: compiled there first
    'throughput_compile': ('throughput', 'bf16+channels_last+fused_adamw,bf16+compile+channels_last+fused_adamw',
                           2, 3, 2),
    # the step is bound by the host (batch 2 and 8 take the same time): CUDA graphs replay its launches
    'throughput_cudagraphs': ('throughput', 'bf16+channels_last+fused_adamw,'
                              'bf16+compile+cudagraphs+channels_last+fused_adamw', 3, 3, 2),
    'paper_compile': ('paper', 'bf16+channels_last+fused_adamw,bf16+compile+channels_last+fused_adamw', 2, 3, 2),
}
SMOKE_PLAN = {'smoke': (None, 'original,original_no_ddp,fp32,fp32+fused_adamw,fp32+channels_last,fp32+checkpoint',
                         1, 1, 1)}
CARD_GIB = 10.5  # what a 12 GB card leaves the allocator after the CUDA context (12e9 B = 11.2 GiB)


def _one_thread_on_cpu(fn):
    """CPU smoke runs of these sections: one thread (small tensors; a busy CPU makes OpenMP threads spin)."""
    def run(*args, **kwargs):
        if torch.cuda.is_available():
            return fn(*args, **kwargs)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _import_original(original_dir):
    import compare_original
    return compare_original.import_original(original_dir) if original_dir else None


@_one_thread_on_cpu
def compare_speed(report, smoke, device, original_dir, reserve_s):
    """Our training iteration (fp32, bf16, each speed option) against the original's, alternating, same
    weights; leaves `reserve_s` of the time budget to the sections after it."""
    import compare_original as co
    original = _import_original(original_dir)
    if original is None:
        log('compare: no --original_dir: ours only')
    figures = {}
    for name, (config, variants, warmup, rounds, iters) in (SMOKE_PLAN if smoke else COMPARE_PLAN).items():
        cfg = (SMOKE_CONFIG if original else SMOKE_CONFIG_OURS) if smoke else co.CONFIGS[config]
        deadline = report.start + report.time_budget_s - reserve_s
        compiled = name.endswith(('_compile', '_cudagraphs'))
        if compiled and time.perf_counter() > deadline - co.COMPILE_RESERVE_S:
            report.skip(f'compare {name}', 'time budget used up')
            continue
        figures[name] = co.run_comparison(cfg, device=device, original=original, variants=variants.split(','),
                                          warmup=warmup, rounds=rounds, iters=iters, name=name, deadline=deadline,
                                          log=lambda line: log(f'compare {line}'), same_model_check=not compiled)
        if compiled:  # over the original: through the eager twin measured with it above
            twin, variant = variants.split(',')
            entry = figures[name]['variants'].get(variant, {})
            over_twin = entry.get(f'speedup_vs_{twin}')
            twin_over_original = figures.get(config, {}).get('variants', {}).get(twin, {}).get('speedup_vs_original')
            if over_twin and twin_over_original:
                entry['speedup_vs_original'] = over_twin * twin_over_original
                log(f'compare {name} {variant}: {entry["speedup_vs_original"]:.2f}x the original '
                    f'({over_twin:.2f}x {twin}, which is {twin_over_original:.2f}x the original)')
    return figures


@_one_thread_on_cpu
def checkpoint_memory(smoke, device, original_dir):
    """Peak memory at the paper's config with and without --checkpoint_activations, each alone and (GPU)
    under an allocator cap of a 12 GB card: does it train there?"""
    import compare_original as co
    original = _import_original(original_dir)
    cfg = dict(SMOKE_CONFIG if original else SMOKE_CONFIG_OURS) if smoke else dict(co.CONFIGS['paper'])
    # +ddp: as under torchrun (the paper trains on 4 GPUs), where DDP's gradient buckets stay allocated
    cases = [('fp32', 2), ('fp32+checkpoint', 2), ('fp32+checkpoint+ddp', 2)] if smoke else \
        [('original', 2), ('fp32', 2), ('fp32+ddp', 2), ('fp32+checkpoint', 2), ('fp32+checkpoint+ddp', 2),
         ('fp32+checkpoint+ddp+fused_adamw', 2), ('bf16+checkpoint', 8)]
    cuda = device == 'cuda'
    figures = {'cap_gib': CARD_GIB if cuda else None}
    for variant, batch in cases:
        if variant == 'original' and original is None:
            continue
        cfg['batch'] = batch
        key = f'{variant} batch {batch}'
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_GIB * 2 ** 30 / total))
        try:
            r = co.run_comparison(cfg, device=device, original=original, variants=[variant], warmup=3, rounds=1,
                                  iters=1, name=f'memory {key}', log=lambda line: None, same_model_check=False)
        finally:
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        entry = r['variants'][variant]
        figures[key] = entry
        if 'error' in entry:
            log(f'memory {key}: {entry["error"]}' + (f' under the {CARD_GIB} GiB cap' if cuda else ''))
        elif cuda:
            log(f'memory {key}: trains under the {CARD_GIB} GiB cap; peak {entry["peak_allocated_gib"]:.2f} GiB '
                f'allocated, {entry["peak_reserved_gib"]:.2f} GiB reserved')
        else:
            log(f'memory {key}: peak {entry["peak_allocated_gib"]:.3f} GiB of tensors '
                f'({entry["activations_gib"]:.3f} saved for backward)')
    reference = figures.get('original batch 2', {}).get('peak_allocated_gib')
    for key, entry in figures.items():
        if reference and isinstance(entry, dict) and 'peak_allocated_gib' in entry and key.endswith('batch 2'):
            entry['vs_original'] = entry['peak_allocated_gib'] / reference
            log(f'memory {key}: {entry["vs_original"]:.2f}x the original\'s peak')
    return figures


@_one_thread_on_cpu
def host_or_device(smoke, device):
    """Is the training step bound by the host? bench/profile_step.py at the MFU target's config (Swin-B 480,
    batch 8, bf16 with --channels_last --fused_adamw): wall time per step against the GPU's time in kernels,
    kernel launches and aten calls per step, and the top kernels."""
    import profile_step
    flags = (['--swin_type', 'nano', '--img_size', '64', '-b', '2', '--bert_layers', '2'] if smoke else
             ['--swin_type', 'base', '--img_size', '480', '-b', '8', '--window12', '--amp', '--channels_last',
              '--fused_adamw'])
    rows, _, summary = profile_step.profile(profile_step.get_args(['--device', device, '--top', '8', *flags]))
    log(f'profile: {profile_step.summary_line(summary)}')
    for name, ms, share in rows:
        log(f'profile: {ms:8.2f} ms {100 * share:5.1f} %  {name[:80]}')
    return dict(summary, top=[{'op': name, 'ms_per_step': ms, 'share': share} for name, ms, share in rows])


def host_syncs(device, original_dir, iterations=10):
    """Host synchronisations in `iterations` steps of our fp32 loop at the paper's config (CUDA sync debug
    mode), by source line; the loop itself reads the loss back once per print interval and at the end."""
    import warnings
    import compare_original as co
    cfg = co.CONFIGS['paper']
    _, _, model_sd, bert = co.prepare_weights(cfg, _import_original(original_dir))  # (the weights built above)
    variant = co.OursVariant(model_sd, bert, cfg, 'fp32', set(), co.synthetic_batch(cfg), torch.device(device))
    variant.run(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            variant.run(iterations)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = {}
    for w in caught:
        if 'synchroniz' in str(w.message):
            line = f'{os.path.relpath(w.filename, REPO) if w.filename.startswith(str(REPO)) else w.filename}:{w.lineno}'
            where[line] = where.get(line, 0) + 1
    log(f'sync {sum(where.values())} host synchronisations in {iterations} iterations'
        + ''.join(f'; {n} x {line}' for line, n in sorted(where.items(), key=lambda x: -x[1])))
    del variant
    gc.collect()
    torch.cuda.empty_cache()
    return {'iterations': iterations, 'syncs': sum(where.values()), 'by_line': where}


def data_loading(smoke, report):
    """The train loader at 480 px with the paper's 2 workers and batch 2 per process, against the
    training step's images/s (the fastest eager variant of the paper config above)."""
    import bench_loader
    paper = (report.figures.get('compare') or {}).get('smoke' if smoke else 'paper') or {}
    rates = [e['images_per_s'] for v, e in paper.get('variants', {}).items()
             if 'images_per_s' in e and not v.startswith('original')]
    argv = ['--images', '8', '--image_px', '128', '--img_size', '64', '--batches', '3', '--workers', '1'] if smoke \
        else ['--images', '64', '--image_px', '800', '--img_size', '480', '--batches', '40', '--workers', '2']
    if rates:
        argv += ['--train_images_per_s', str(max(rates))]
    return bench_loader.run(bench_loader.get_args(argv + ['-b', '2']), log=lambda line: log(line))


def write_json(figures, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=path.parent, delete=False, suffix='.tmp') as f:
        json.dump(figures, f, indent=2, default=str)
    os.replace(f.name, path)
    log(f'json written: {path}')


def get_args_parser():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cpu-smoke', action='store_true',
                        help='tiny sizes; runs on CPU (kernel sections are skipped without CUDA)')
    parser.add_argument('--json', default='', help='where to write all figures (default: $OUT/gpu_check.json)')
    parser.add_argument('--build-dir', default='', help='JIT build folder (default: a fresh temporary folder)')
    parser.add_argument('--skip-train', action='store_true', help='skip the training-step benchmark')
    parser.add_argument('--time-budget', type=float, default=450.0,
                        help='seconds after which remaining sections are skipped')
    parser.add_argument('--original_dir', default='',
                        help='a clone of AHideoKuzeA/LRB-WREL: the speed and memory sections compare with it')
    parser.add_argument('--skip-speed', action='store_true',
                        help='skip the speed-option, memory, host-sync and data-loading sections')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.time_budget <= 0:
        raise utils.InputError('--time-budget must be positive')
    json_path = args.json or (os.path.join(os.environ['OUT'], 'gpu_check.json') if os.environ.get('OUT') else '')
    bench_dir = str(Path(__file__).resolve().parent)
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)

    report = Report(args.time_budget)
    report.figures['mode'] = 'cpu-smoke' if args.cpu_smoke else 'gpu'
    report.run('env', environment)
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.cpu_smoke:
        log('no CUDA device: nothing to check on the GPU (use --cpu-smoke for a CPU dry run)')
    device = 'cuda' if has_cuda else 'cpu'

    if has_cuda:
        build_dir = args.build_dir or tempfile.mkdtemp(prefix='msda_build_')
        built = report.run('build', build_extension, build_dir)
        if built:
            report.run('check', correctness_checks, args.cpu_smoke, 'cuda')
        else:
            report.skip('check', 'the extension did not build')
    else:
        report.skip('build', 'no CUDA device')
        if args.cpu_smoke:
            report.run('check', correctness_checks, True, 'cpu')
        else:
            report.skip('check', 'no CUDA device')

    if has_cuda or args.cpu_smoke:
        report.run('speed', speed, args.cpu_smoke, device)
        report.run('steps', step_variants, report, args.cpu_smoke, device)  # issue 21: eager / graphs / compiled
        if args.skip_train:
            report.skip('train', '--skip-train')
        else:
            report.run('train', training, report, args.cpu_smoke, device)
        report.run('lrb', lrb_stages, args.cpu_smoke, device)  # not a --skip-train section: it times the LRB stages
        if has_cuda:
            report.run('stages', stages_cli, device)
        else:
            report.skip('stages', 'no CUDA device (tests/test_lrb_cli.py runs the same chain on CPU)')
        if args.skip_speed:
            for name in ('compare', 'memory', 'sync', 'profile', 'loader'):
                report.skip(name, '--skip-speed')
        else:
            report.run('compare', compare_speed, report, args.cpu_smoke, device, args.original_dir, 60)
            report.run('memory', checkpoint_memory, args.cpu_smoke, device, args.original_dir)
            if has_cuda:
                report.run('sync', host_syncs, device, args.original_dir)
            else:
                report.skip('sync', 'no CUDA device')
            report.run('profile', host_or_device, args.cpu_smoke, device)
            report.run('loader', data_loading, args.cpu_smoke, report)

    report.figures['total_seconds'] = round(report.elapsed(), 1)
    log(f'total_seconds: {report.elapsed():.1f}')
    if report.figures['errors']:
        log(f'errors in: {", ".join(report.figures["errors"])}')
    if json_path:
        write_json(report.figures, json_path)


if __name__ == '__main__':
    utils.run_cli(main)
