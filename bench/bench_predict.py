"""Time per image of predict.py's pipeline: decode, resize, tokenize, forward, mask back to the image's
size, mask + overlay PNGs (everything but loading the checkpoint).

    OMP_NUM_THREADS=1 python bench/bench_predict.py --swin_type base --img_size 480 --window12 --device cpu

Random weights: RMSIN and a text encoder of BERT-base's shape (768 wide, 12 layers, 12 heads) with a
small vocabulary built locally by bert.build_small (the vocabulary size does not change the compute), so
nothing is downloaded. Images are 800 x 800 JPEGs, the size of RRSIS-D's; each gets --expressions
expressions, run in batches of --batch pairs. Prints seconds per image and per (image, expression) pair
after --warmup untimed images, how much of it is the network's forward, and the CPU time per image
(the wall time of a one-thread run on an idle machine).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402

EXPRESSIONS = ['the storage tank at the top left', 'the large vehicle on the road in the middle',
               'the white ship in the harbor on the right', 'the tennis court at the bottom']


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--swin_type', default='base')
    p.add_argument('--img_size', default=480, type=int)
    p.add_argument('--window12', action='store_true', help='window size 12 (the paper\'s Swin-B weights)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--images', default=2, type=int, help='timed images')
    p.add_argument('--warmup', default=1, type=int, help='untimed images first')
    p.add_argument('--expressions', default=1, type=int, help=f'expressions per image (1-{len(EXPRESSIONS)})')
    p.add_argument('--batch', default=1, type=int, help='(image, expression) pairs per forward')
    p.add_argument('--image_size', default=800, type=int, help='side of the square test images')
    p.add_argument('--bert_hidden', default=768, type=int)
    p.add_argument('--bert_layers', default=12, type=int)
    p.add_argument('--threads', default=0, type=int, help='CPU threads (0 = torch default / OMP_NUM_THREADS)')
    return p.parse_args(argv)


def validate(args):
    if args.img_size < 32 or args.img_size % 32:
        raise utils.InputError(f'--img_size {args.img_size}: must be a positive multiple of 32')
    if args.images < 1 or args.warmup < 0 or args.batch < 1 or args.image_size < 1:
        raise utils.InputError('--images, --batch and --image_size must be >= 1, --warmup >= 0')
    if not 1 <= args.expressions <= len(EXPRESSIONS):
        raise utils.InputError(f'--expressions {args.expressions}: must be in 1..{len(EXPRESSIONS)}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise utils.InputError(f'--device {args.device}: CUDA is not available here (use --device cpu)')


def make_images(folder, n, side):
    """Overhead-looking JPEGs: smooth ground, a road, some blocks, sensor noise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:side, 0:side] / side
        ground = np.stack([120 + 40 * np.sin(6 * x + i), 130 + 30 * np.cos(5 * y), 100 + 20 * x], -1)
        ground[int(side * 0.45):int(side * 0.52)] = 70  # a road
        for _ in range(8):
            r, c, s = *rng.integers(0, side - 60, 2), int(rng.integers(20, 60))
            ground[r:r + s, c:c + s] = rng.integers(150, 255, 3)
        pixels = np.clip(ground + rng.normal(0, 8, ground.shape), 0, 255).astype(np.uint8)
        path = Path(folder) / f'img{i:02d}.jpg'
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    from bert.build_small import build_small_bert
    from bert.encoder import load_tokenizer
    from lib import inference
    from lib.model.build import build_model
    from transformers.utils import logging as hf_logging
    logging.getLogger('lrb').setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # no 'Writing model shards' bar in the figures
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix='bench_predict_') as tmp:
        tmp = Path(tmp)
        tic = time.perf_counter()
        heads = max(1, args.bert_hidden // 64)
        build_small_bert(EXPRESSIONS * 50, tmp / 'bert', hidden_size=args.bert_hidden,
                         num_hidden_layers=args.bert_layers, num_attention_heads=heads, seed=0)
        model_args = utils.get_parser().parse_args(
            ['--swin_type', args.swin_type, '--img_size', str(args.img_size), '--pretrained_swin_weights', '',
             '--ck_bert', str(tmp / 'bert')] + (['--window12'] if args.window12 else []))
        torch.manual_seed(0)
        model, bert = build_model(model_args, pretrained='')
        model.to(device).eval()
        bert.to(device).eval()
        n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in bert.parameters())
        build_s = time.perf_counter() - tic

        paths = make_images(tmp, args.warmup + args.images, args.image_size)
        predictor = inference.Predictor(model, bert, load_tokenizer(tmp / 'bert'), args.img_size, device)
        forward_s = [0.0]
        call = predictor.__call__

        def timed_call(*a):
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = call(*a)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            forward_s[0] += time.perf_counter() - t0
            return out

        expressions = EXPRESSIONS[:args.expressions]
        if args.warmup:
            inference.predict_all(_Timed(predictor, timed_call), paths[:args.warmup], expressions, tmp / 'warm',
                                  args.batch)
        forward_s[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        records = inference.predict_all(_Timed(predictor, timed_call), paths[args.warmup:], expressions,
                                        tmp / 'out', args.batch)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0

    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'
    per_image = total / args.images
    print(f'predict.py pipeline: RMSIN swin {args.swin_type}, {args.img_size} px, window '
          f'{12 if args.window12 else 7}, random weights; random BERT {args.bert_hidden} wide, {args.bert_layers} layers'
          f'{" (bert-base shape)" if (args.bert_hidden, args.bert_layers) == (768, 12) else ""}, vocabulary built '
          f'locally; {n_params / 1e6:.0f} M parameters; {where}')
    print(f'{args.images} image(s) of {args.image_size} x {args.image_size} (JPEG) x {args.expressions} '
          f'expression(s), batches of {args.batch} pair(s), after {args.warmup} warm-up image(s); '
          f'model build {build_s:.1f} s (not counted)')
    print(f'time per image: {per_image:.2f} s; per (image, expression) pair: {total / len(records):.2f} s; '
          f'network forward {forward_s[0] / total:.0%} of it')
    # on a shared machine wall time includes waiting for a core; CPU time does not (with one thread it
    # is what the wall time would be on an idle machine)
    print(f'CPU time per image: {cpu / args.images:.2f} s (all threads together)')


class _Timed:
    """The predictor with its forward timed: calls go through `call`, everything else to the predictor."""

    def __init__(self, predictor, call):
        self._predictor, self._call = predictor, call

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def __call__(self, *args):
        return self._call(*args)


if __name__ == '__main__':
    utils.run_cli(main)
