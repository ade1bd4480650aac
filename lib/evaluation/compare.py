"""Is a gap a result or noise? Bootstrap intervals over refs, paired differences, permutation p-values.

Sentences of one ref share an image and a target, so they are not independent: every resample draws
refs (with replacement) and keeps all their sentences. Each ref is summed once (`ref_table`), so a
resample's metrics are weighted sums: counts of draws [resamples, refs] @ per-ref sums [refs, columns].
Several record files of one method (its seeds) give a two-level bootstrap: each resample draws the seeds
with replacement and the refs once (the same test items for every seed and both methods, which keeps the
pairing); its value is the mean over the drawn seeds. docs/evaluation.md has the method and references.

Vectorized numpy rather than scipy.stats: `permutation_test` takes 3.2 s for 10,000 paired permutations
of 3,481 refs on one core even with a trivial statistic (its permutations are built by sorting random
keys), the swap product below 0.1 s; `bootstrap` cannot share one draw of refs between seeds and methods.
The tests check both against scipy.stats on small data.

    python -m lib.evaluation.compare A_records.npz B_records.npz
    python -m lib.evaluation.compare --a A_seed0.npz A_seed1.npz --b B_seed0.npz B_seed1.npz --names LRB Naive
"""
import argparse
from typing import NamedTuple

import numpy as np

from utils import InputError, run_cli

from .records import PREC_THRESHOLDS, check_comparable, load_records, sentence_ious, summary

TABLE_COLUMNS = ('I', 'U', 'iou_sum', 'sentences', *(f'hits@{t}' for t in PREC_THRESHOLDS))
# metric -> (numerator, denominator) columns of the ref table; every metric is 100 * sum / sum
METRIC_COLUMNS = {'oIoU': ('I', 'U'), 'mIoU': ('iou_sum', 'sentences'),
                  **{f'precision@{t}': (f'hits@{t}', 'sentences') for t in PREC_THRESHOLDS}}
METRICS = tuple(METRIC_COLUMNS)
CHUNK_CELLS = 4_000_000  # refs x resamples drawn at once (32 MB of int64)


class RefTable(NamedTuple):
    ref_ids: np.ndarray  # [refs] sorted
    sums: np.ndarray     # [refs, len(TABLE_COLUMNS)] float64: per ref, sums over its sentences


def ref_table(records):
    """Per-ref sums of I, U, sentence IoU, sentences and hits at each precision threshold."""
    ref_ids, inverse = np.unique(records.ref_id, return_inverse=True)
    ious = sentence_ious(records)
    per_sentence = [records.I, records.U, ious, np.ones(len(records))] + [ious >= t for t in PREC_THRESHOLDS]
    sums = np.stack([np.bincount(inverse, weights=np.asarray(c, dtype=np.float64), minlength=len(ref_ids))
                     for c in per_sentence], 1)
    return RefTable(ref_ids, sums)


def _check_metric(metric):
    if metric not in METRIC_COLUMNS:
        raise InputError(f"metric '{metric}': choose from {', '.join(METRICS)}")


def _check_levels(confidence, resamples):
    if not 0 < confidence < 1:
        raise InputError(f'confidence {confidence}: give a number between 0 and 1 (0.95 for 95 %)')
    if int(resamples) != resamples or resamples < 1:
        raise InputError(f'resamples {resamples}: give a positive whole number')


def ratio_columns(metric):
    """Indices in TABLE_COLUMNS of the metric's numerator and denominator."""
    return [TABLE_COLUMNS.index(c) for c in METRIC_COLUMNS[metric]]


def _percent(num, den):
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(den > 0, 100.0 * num / den, 0.0)


def metric_from_sums(sums, metric):
    """The metric in percent from summed table columns (last axis, TABLE_COLUMNS order); any leading axes."""
    num, den = ratio_columns(metric)
    return _percent(sums[..., num], sums[..., den])


def _as_list(records):
    return list(records) if isinstance(records, (list, tuple)) else [records]


def _aligned_tables(sides, names):
    """Per side, the ref-table sums of each seed; every file checked comparable with the first."""
    first, first_name = sides[0][0], names[0][0]
    for side, side_names in zip(sides, names):
        for records, name in zip(side, side_names):
            if records is not first:
                check_comparable(first, records, first_name, name)
    return [[ref_table(r).sums for r in side] for side in sides]


def _bootstrap(tables, metric, resamples, rng):
    """[resamples, sides] metric values: refs drawn once per resample for every seed of every side, seeds
    drawn per side (with replacement); each side's value is the mean over its drawn seeds."""
    n_refs = tables[0][0].shape[0]
    columns = ratio_columns(metric)  # only the metric's two columns are resampled
    stacked = np.concatenate([t[:, columns] for side in tables for t in side], 1)  # [refs, seeds x 2]
    out = np.empty((resamples, len(tables)))
    chunk = max(1, CHUNK_CELLS // max(n_refs, 1))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        draws = rng.integers(0, n_refs, size=(count, n_refs))
        draws += np.arange(count)[:, None] * n_refs
        weights = np.bincount(draws.ravel(), minlength=count * n_refs).reshape(count, n_refs)
        sums = (weights.astype(np.float64) @ stacked).reshape(count, -1, 2)  # [count, seeds, 2]
        values = _percent(sums[..., 0], sums[..., 1])
        first = 0
        for side_index, side in enumerate(tables):
            per_seed = values[:, first:first + len(side)]
            first += len(side)
            if len(side) == 1:
                out[start:start + count, side_index] = per_seed[:, 0]
            else:
                picks = rng.integers(0, len(side), size=(count, len(side)))
                out[start:start + count, side_index] = np.take_along_axis(per_seed, picks, 1).mean(1)
    return out


def _bounds(values, confidence):
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _file_names(side, label):
    return [r.source or f'{label}[{i}]' for i, r in enumerate(side)]


def interval(records_list, metric='oIoU', confidence=0.95, resamples=10000, seed=0):
    """dict(value, low, high): the metric (mean over seeds) and its percentile bootstrap interval over refs
    (two levels, seeds then refs, when `records_list` holds several seeds of one method); low and high
    are NaN with fewer than 2 refs."""
    _check_metric(metric)
    _check_levels(confidence, resamples)
    side = _as_list(records_list)
    tables = _aligned_tables([side], [_file_names(side, 'records')])
    value = float(np.mean([summary(r)[metric] for r in side]))
    if tables[0][0].shape[0] < 2:  # resampling one ref says nothing about the spread
        return {'value': value, 'low': float('nan'), 'high': float('nan')}
    low, high = _bounds(_bootstrap(tables, metric, int(resamples), np.random.default_rng(seed))[:, 0],
                        confidence)
    return {'value': value, 'low': low, 'high': high}


def paired_difference(records_a, records_b, metric='oIoU', confidence=0.95, resamples=10000, seed=0):
    """dict(diff, low, high, p_value, excludes_zero) of A - B (means over seeds).

    Interval: paired bootstrap over refs (the same refs for A and B in each resample; seeds drawn per side).
    p_value: paired permutation test (two-sided), A and B swapped per ref at random, on the seed-averaged
    per-ref sums; `resamples` permutations. excludes_zero: the interval lies wholly above or below 0."""
    _check_metric(metric)
    _check_levels(confidence, resamples)
    side_a, side_b = _as_list(records_a), _as_list(records_b)
    tables = _aligned_tables([side_a, side_b], [_file_names(side_a, 'A'), _file_names(side_b, 'B')])
    diff = float(np.mean([summary(r)[metric] for r in side_a]) - np.mean([summary(r)[metric] for r in side_b]))
    if tables[0][0].shape[0] < 2:
        return {'diff': diff, 'low': float('nan'), 'high': float('nan'), 'p_value': float('nan'),
                'excludes_zero': False}
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    values = _bootstrap(tables, metric, int(resamples), boot_rng)
    low, high = _bounds(values[:, 0] - values[:, 1], confidence)
    p_value = permutation_p_value(np.mean(tables[0], 0), np.mean(tables[1], 0), metric, int(resamples), perm_rng)
    return {'diff': diff, 'low': low, 'high': high, 'p_value': p_value, 'excludes_zero': bool(low > 0 or high < 0)}


def permutation_p_value(sums_a, sums_b, metric, permutations, rng):
    """Two-sided p-value of metric(A) - metric(B) under 'A and B are exchangeable on every ref': each
    permutation swaps the rows of a random half of the refs; p = (1 + #{|t*| >= |t|}) / (1 + permutations)."""
    columns = ratio_columns(metric)
    sums_a, sums_b = sums_a[:, columns], sums_b[:, columns]
    total_a, total_b = sums_a.sum(0), sums_b.sum(0)
    observed = abs(float(_percent(*total_a) - _percent(*total_b)))
    delta = sums_a - sums_b  # swapping ref r moves delta[r] from A's totals to B's
    n_refs = len(delta)
    chunk = max(1, CHUNK_CELLS // max(n_refs, 1))
    extreme = 0
    for start in range(0, permutations, chunk):
        count = min(chunk, permutations - start)
        moved = (rng.random((count, n_refs)) < 0.5).astype(np.float64) @ delta
        a, b = total_a - moved, total_b + moved
        t = _percent(a[:, 0], a[:, 1]) - _percent(b[:, 0], b[:, 1])
        extreme += int((np.abs(t) >= observed * (1 - 1e-12)).sum())  # the tolerance keeps ties as ties
    return (1 + extreme) / (1 + permutations)


def format_value(value, low, high, digits=2, signed=False):
    """'74.32 [73.41, 75.20]' (signed: '+0.04 [-0.52, +0.60]')."""
    sign = '+' if signed else ''
    if np.isnan(low):
        return f'{value:{sign}.{digits}f}'
    return f'{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]'


def comparison_markdown(side_a, side_b, names=('A', 'B'), metrics=('oIoU', 'mIoU', 'precision@0.5'),
                        confidence=0.95, resamples=10000, seed=0):
    """The command's table: each side with its interval, A - B with its paired interval and p-value."""
    first = side_a[0]
    level = f'{100 * confidence:g} %'
    def files(side):
        return '1 file' if len(side) == 1 else f'{len(side)} files (seeds)'
    lines = [f"{names[0]} ({files(side_a)}) vs {names[1]} ({files(side_b)}): "
             f"{first.meta.get('dataset')} {first.meta.get('split')} split, {len(first):,} sentences of "
             f"{len(np.unique(first.ref_id)):,} refs, img_size {first.meta.get('img_size')}",
             f'{level} bootstrap intervals over refs ({resamples:,} resamples, seed {seed}); p: paired '
             f'permutation test; * the interval of the difference excludes 0', '',
             f'| metric | {names[0]} | {names[1]} | {names[0]} − {names[1]} | p |', '|---|---|---|---|---|']
    for metric in metrics:
        a, b = (interval(s, metric, confidence, resamples, seed) for s in (side_a, side_b))
        d = paired_difference(side_a, side_b, metric, confidence, resamples, seed)
        mark = ' *' if d['excludes_zero'] else ''
        lines.append(f"| {metric} | {format_value(a['value'], a['low'], a['high'])} | "
                     f"{format_value(b['value'], b['low'], b['high'])} | "
                     f"{format_value(d['diff'], d['low'], d['high'], signed=True)}{mark} | {d['p_value']:.3g} |")
    return '\n'.join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog='python -m lib.evaluation.compare',
        description='Compare two methods evaluated on the same split (record files of test.py, '
                    '*_records.npz): each metric with its bootstrap interval over refs, the difference A - B '
                    'with its paired interval and a permutation p-value.')
    p.add_argument('files', nargs='*', metavar='RECORDS', help='A.npz B.npz: one record file per method')
    p.add_argument('--a', nargs='+', metavar='RECORDS', help="method A's record files, one per seed")
    p.add_argument('--b', nargs='+', metavar='RECORDS', help="method B's record files, one per seed")
    p.add_argument('--names', nargs=2, metavar=('A', 'B'), help='names for the table (default: A, B)')
    p.add_argument('--metrics', nargs='+', default=['oIoU', 'mIoU', 'precision@0.5'], choices=METRICS)
    p.add_argument('--resamples', type=int, default=10000, help='bootstrap resamples and permutations')
    p.add_argument('--confidence', type=float, default=0.95, help='interval level (default 0.95)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the resampling (default 0)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.files and (args.a or args.b):
        raise InputError('give either two record files (A B) or --a ... --b ..., not both')
    if not args.files and not (args.a and args.b):
        raise InputError('give two record files (A B), or --a FILES --b FILES for several seeds per method')
    if args.files and len(args.files) != 2:
        raise InputError(f'give two record files (A B), got {len(args.files)}; several seeds: --a ... --b ...')
    paths_a, paths_b = ([args.files[0]], [args.files[1]]) if args.files else (args.a, args.b)
    _check_levels(args.confidence, args.resamples)
    sides = [[load_records(p) for p in paths] for paths in (paths_a, paths_b)]
    print(comparison_markdown(*sides, names=tuple(args.names or ('A', 'B')), metrics=args.metrics,
                              confidence=args.confidence, resamples=args.resamples, seed=args.seed))


if __name__ == '__main__':
    run_cli(main)
