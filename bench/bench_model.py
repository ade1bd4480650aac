"""Time and memory of the RMSIN model (no BERT): inference forward and a training forward+backward.

    python bench/bench_model.py --swin_type base --img_size 480 --batch 1 --device cpu --iters 3

Prints mean seconds per iteration after warm-up and the peak memory: on CUDA the peak of
torch.cuda.max_memory_allocated per phase; on CPU the process's peak resident set size
(ru_maxrss, monotonic, so the training figure includes the inference one).
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402
from lib.model.backbone import SWIN_PRESETS  # noqa: E402
from lib.model.segmentation import lavt  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--swin_type', default='base', help=f'one of {", ".join(SWIN_PRESETS)}')
    p.add_argument('--img_size', default=480, type=int, help='square input size, a multiple of 32')
    p.add_argument('--batch', default=1, type=int)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--iters', default=5, type=int, help='timed iterations per phase')
    p.add_argument('--warmup', default=1, type=int, help='untimed iterations per phase')
    p.add_argument('--text_dim', default=768, type=int, help='text feature width (768 = bert-base)')
    p.add_argument('--words', default=20, type=int, help='tokens per sentence')
    p.add_argument('--window12', action='store_true', help='window size 12 (the 384-px Swin weights)')
    p.add_argument('--threads', default=0, type=int, help='CPU threads (0 = torch default)')
    return p.parse_args(argv)


def validate(args):
    if args.swin_type not in SWIN_PRESETS:
        raise utils.InputError(f'--swin_type {args.swin_type!r}: choose one of {", ".join(SWIN_PRESETS)}')
    if args.img_size % 32 or args.img_size <= 0:
        raise utils.InputError(f'--img_size {args.img_size} is not a positive multiple of 32')
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise utils.InputError('--batch and --iters must be >= 1, --warmup >= 0')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise utils.InputError(f'--device {args.device}: CUDA is not available here (use --device cpu)')


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(step, args, device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / args.iters, peak_memory_mb(device)


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_args = utils.get_parser().parse_args(
        ['--swin_type', args.swin_type, '--img_size', str(args.img_size), '--pretrained_swin_weights', '']
        + (['--window12'] if args.window12 else []))
    torch.manual_seed(0)
    model = lavt('', model_args, text_dim=args.text_dim).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    image = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    l_feats = torch.randn(args.batch, args.text_dim, args.words, device=device)
    l_mask = torch.ones(args.batch, args.words, 1, device=device)
    l_mask[:, args.words // 2:] = 0

    def forward():
        with torch.no_grad():
            model(image, l_feats, l_mask)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(image, l_feats, l_mask).float().logsumexp(1).mean().backward()

    model.eval()
    fwd_s, fwd_mem = timed(forward, args, device)
    model.train()
    train_s, train_mem = timed(forward_backward, args, device)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'cpu ({torch.get_num_threads()} threads)'
    mem_kind = 'max_memory_allocated' if device.type == 'cuda' else 'peak RSS'
    print(f'RMSIN swin {args.swin_type}, {args.img_size} px, batch {args.batch}, text {args.text_dim}, '
          f'{n_params / 1e6:.1f} M parameters, {where}, {args.iters} iters after {args.warmup} warm-up')
    print(f'forward (eval, no grad): {fwd_s:.3f} s/iter, {mem_kind} {fwd_mem:.0f} MiB')
    print(f'forward+backward (train): {train_s:.3f} s/iter, {mem_kind} {train_mem:.0f} MiB')


if __name__ == '__main__':
    utils.run_cli(main)
