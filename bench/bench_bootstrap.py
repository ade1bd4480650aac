"""Time of the paired bootstrap and permutation test at RRSIS-D's test size, on one core; records file size.

    .venv/bin/python bench/bench_bootstrap.py
    .venv/bin/python bench/bench_bootstrap.py --sentences 3481 --resamples 10000 --seeds 3

Synthetic records of --sentences refs (one sentence each, as RRSIS-D), evaluated at 480 px. One core:
BLAS/OpenMP threads 1 and the process pinned to one CPU (the resampling is numpy only; torch is not used).
Times are the fastest of --rounds rounds, as wall time and as this process's CPU time (the same on an
idle machine; on a shared one the CPU time is what one free core would take).
"""
import argparse
import os
import sys
import tempfile
import time

for _var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    os.environ[_var] = '1'  # before numpy loads its BLAS
if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lib.evaluation import compare  # noqa: E402
from lib.evaluation.records import SentenceRecords, load_records  # noqa: E402


def synthetic_records(n, seed, img_size=480, shift=0.0):
    """n refs of one sentence: target areas spread over 0.05-60 % of the image, IoUs around 0.75."""
    rng = np.random.default_rng(seed)
    pixels = img_size * img_size
    area = np.maximum(1, (pixels * np.exp(rng.uniform(np.log(5e-4), np.log(0.6), n))).astype(np.int64))
    quality = np.clip(rng.beta(6, 2, n) + shift, 0, 1)
    inter = (area * quality).astype(np.int64)
    union = area + rng.binomial(area, 1 - quality)
    columns = {'ref_id': np.arange(n), 'sentence': np.zeros(n), 'category_id': rng.integers(0, 20, n),
               'is_weak': np.zeros(n, dtype=bool), 'area': area, 'pixels': np.full(n, pixels),
               'I': inter, 'U': union}
    meta = {'dataset': 'rrsisd', 'split': 'test', 'img_size': img_size, 'checkpoint': f'synthetic{seed}.pth',
            'weights_key': 'model', 'model': 'lavt', 'swin_type': 'base'}
    return SentenceRecords(columns, [f'class {i}' for i in range(20)], meta)


def fastest(fn, rounds):
    """(wall seconds, CPU seconds) of the fastest of `rounds` calls."""
    best = (float('inf'), float('inf'))
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sentences', type=int, default=3481, help="refs (one sentence each); RRSIS-D's test: 3,481")
    p.add_argument('--resamples', type=int, default=10000)
    p.add_argument('--seeds', type=int, default=3, help='record files per method for the two-level timing')
    p.add_argument('--rounds', type=int, default=3)
    args = p.parse_args(argv)

    a = synthetic_records(args.sentences, 0)
    b = synthetic_records(args.sentences, 1, shift=0.01)
    n, r = args.sentences, args.resamples
    tables = [[compare.ref_table(a).sums], [compare.ref_table(b).sums]]
    boot = fastest(lambda: compare._bootstrap(tables, 'oIoU', r, np.random.default_rng(0)), args.rounds)
    perm = fastest(lambda: compare.permutation_p_value(tables[0][0], tables[1][0], 'oIoU', r,
                                                       np.random.default_rng(0)), args.rounds)
    whole = fastest(lambda: compare.paired_difference(a, b, 'oIoU', resamples=r), args.rounds)
    seeds_a = [synthetic_records(n, s) for s in range(args.seeds)]
    seeds_b = [synthetic_records(n, 100 + s, shift=0.01) for s in range(args.seeds)]
    two_level = fastest(lambda: compare.paired_difference(seeds_a, seeds_b, 'oIoU', resamples=r), args.rounds)
    d = compare.paired_difference(a, b, 'oIoU', resamples=r)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'records.npz')
        a.save(path)
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        load_records(path)
        load = time.perf_counter() - t0

    print(f'{n:,} sentences, {r:,} resamples, one core (fastest of {args.rounds}; wall / CPU seconds):')
    for label, (wall, cpu) in [('paired bootstrap over refs (oIoU, A and B)', boot),
                               (f'paired permutation test ({r:,} permutations)', perm),
                               ('paired_difference, 1 seed per method (both)', whole),
                               (f'paired_difference, {args.seeds} seeds per method (two levels)', two_level)]:
        print(f'  {label:<52} {wall:.3f} / {cpu:.3f}')
    print(f"  example: oIoU A - B = {d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], p = {d['p_value']:.3g}")
    print(f'records file: {size:,} bytes ({size / n:.1f} bytes per sentence), loaded in {load * 1000:.1f} ms')


if __name__ == '__main__':
    main()
