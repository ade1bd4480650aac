"""Throughput of the training DataLoader (decode, random boxes, resize, tokens), to show whether it
keeps up with the training step.

    python bench/bench_loader.py                                   # 800-px demo images, the paper's workers
    python bench/bench_loader.py --refer_data_root DATA --workers 2 -b 2 --train_images_per_s 40

Without --refer_data_root it generates demo data with 800-px JPEG images (RRSIS-D's size). The paper
runs `--workers 8` over 4 GPUs, i.e. 2 workers and a batch of 2 per process: the defaults here.
Prints, for pinned and pageable memory: the time to the first batch (worker start-up, paid every epoch
since workers are not persistent) and the steady images/s of one process's loader; with
--train_images_per_s, how many times faster than the training step the loader is.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--refer_data_root', default='', help='a data root (default: generated demo data)')
    p.add_argument('--dataset', default='rrsisd')
    p.add_argument('--images', type=int, default=64, help='demo images to generate')
    p.add_argument('--image_px', type=int, default=800, help='demo image size')
    p.add_argument('--img_size', type=int, default=480, help='training input size')
    p.add_argument('-b', '--batch-size', type=int, default=2, help='per-process batch')
    p.add_argument('--workers', type=int, default=2, help='loader workers of one process')
    p.add_argument('--batches', type=int, default=20, help='timed batches after the first')
    p.add_argument('--train_images_per_s', type=float, default=0.0,
                   help='images/s of the training step to compare with (e.g. from compare_original.py)')
    return p.parse_args(argv)


def build_loader(data_root, dataset, img_size, batch, workers, pin_memory, tokenizer_dir):
    from bert.encoder import load_tokenizer
    from lib.training.data import build_train_loader
    from refer.dataset import build_dataset
    args = utils.get_parser().parse_args(['--refer_data_root', str(data_root), '--dataset', dataset,
                                          '--img_size', str(img_size), '--workers', str(workers)])
    train_set = build_dataset(args, 'train', load_tokenizer(str(tokenizer_dir)), eval_mode=False)
    return build_train_loader(train_set, batch, workers, seed=0, pin_memory=pin_memory)


def measure(loader, batches):
    """-> (seconds to the first batch, steady images/s over `batches` more batches)."""
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    to_first = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # a short epoch: start the next one (its start-up is counted too)
            it = iter(loader)
            batch = next(it)
        n += batch['image'].shape[0]
    del first
    return to_first, n / (time.perf_counter() - start)


def run(args, log=print):
    """-> {'pinned': {...}, 'pageable': {...}, ...}; generates demo data and a tokenizer when needed."""
    from bert.build_small import build_small_bert, collect_expressions
    with tempfile.TemporaryDirectory(prefix='bench_loader_') as tmp:
        root = args.refer_data_root
        if not root:
            from refer.demo_data import generate
            root = Path(tmp) / 'data'
            generate(root, images=args.images, size=args.image_px, seed=0)
        tokenizer_dir = Path(tmp) / 'tokenizer'
        build_small_bert(collect_expressions(root, args.dataset, 'unc'), tokenizer_dir, hidden_size=8,
                         num_hidden_layers=1, num_attention_heads=1)
        figures = {'workers': args.workers, 'batch': args.batch_size, 'img_size': args.img_size,
                   'source': args.refer_data_root or f'demo data, {args.image_px}-px JPEG'}
        for pinned in (False, True):
            loader = build_loader(root, args.dataset, args.img_size, args.batch_size, args.workers,
                                  pinned and torch.cuda.is_available(), tokenizer_dir)
            to_first, images_per_s = measure(loader, args.batches)
            key = 'pinned' if pinned else 'pageable'
            if pinned and not torch.cuda.is_available():
                key = 'pinned (no CUDA: not pinned)'
            figures[key] = {'first_batch_s': to_first, 'images_per_s': images_per_s}
            line = (f'loader {args.workers} workers, batch {args.batch_size}, {args.img_size} px, {key}: '
                    f'{images_per_s:.1f} images/s, first batch after {to_first:.2f} s')
            if args.train_images_per_s:
                figures[key]['headroom'] = images_per_s / args.train_images_per_s
                line += f' ({images_per_s / args.train_images_per_s:.1f}x the training step\'s ' \
                        f'{args.train_images_per_s:.1f} images/s)'
            log(line)
            del loader
    return figures


def main(argv=None):
    args = get_args(argv)
    if min(args.batch_size, args.batches, args.images) < 1 or args.workers < 0:
        raise utils.InputError('--batch-size, --batches and --images must be >= 1, --workers >= 0')
    run(args)


if __name__ == '__main__':
    utils.run_cli(main)
