"""Where a method gains or loses: metrics per category and per target size, each with its interval.

Size is the target's share of the image at the evaluated size (area / pixels; a share, so the bins mean
the same at any img_size). The thresholds, 1 % and 10 %, are an 80 x 80 and a 253 x 253 box on
RRSIS-D's 800 x 800 images: vehicles, ships, storage tanks and chimneys fall below 1 %, courts and
bridges between, ground track fields, stadiums, dams and airports above 10 %, so no bin of RRSIS-D's
test split should be empty (not yet counted on its masks, which the shared data lack; docs/evaluation.md).
"""
import numpy as np

from .compare import format_value, interval
from .records import check_comparable

SIZE_BINS = (('small', 0.0, 0.01), ('medium', 0.01, 0.10), ('large', 0.10, 1.0))  # share in [low, high)


def size_labels():
    """'small (< 1 %)', 'medium (1–10 %)', 'large (≥ 10 %)'."""
    return [f'{name} (< {100 * high:g} %)' if low == 0 else f'{name} (≥ {100 * low:g} %)' if high == 1 else
            f'{name} ({100 * low:g}–{100 * high:g} %)' for name, low, high in SIZE_BINS]


def size_bin(records):
    """Index into SIZE_BINS of each sentence (a share of exactly 100 % is 'large')."""
    edges = [low for _, low, _ in SIZE_BINS[1:]]
    return np.digitize(records.share, edges)


def category_groups(records):
    """(name, mask-maker) of each category present, in category-id order."""
    present = np.unique(records.category_id)
    return [(records.categories[c] if 0 <= c < len(records.categories) and records.categories[c] else f'class {c}',
             lambda r, c=c: r.category_id == c) for c in present]


def size_groups():
    return [(label, lambda r, i=i: size_bin(r) == i) for i, label in enumerate(size_labels())]


def group_table(records_by_method, groups, title, metric, confidence, resamples, seed):
    """A Markdown table: a row per group (sentences, each method's metric with its interval), then 'all'."""
    names = list(records_by_method)
    first = records_by_method[names[0]][0]
    lines = [f'#### {metric} per {title}', '',
             f"| {title} | sentences | {' | '.join(names)} |", '|---|---:|' + '---|' * len(names)]
    for label, select in [*groups, ('all', lambda r: np.ones(len(r), dtype=bool))]:
        count = int(select(first).sum())
        cells = []
        for name in names:
            subset = [r.subset(select(r)) for r in records_by_method[name]]
            if count == 0:
                cells.append('—')
                continue
            got = interval(subset, metric, confidence, resamples, seed)
            cells.append(format_value(got['value'], got['low'], got['high']))
        label = f'**{label}**' if label == 'all' else label
        lines.append(f"| {label} | {count:,} | {' | '.join(cells)} |")
    return '\n'.join(lines)


def breakdown_markdown(records_by_method, metrics=('oIoU', 'mIoU'), confidence=0.95, resamples=10000, seed=0):
    """Per-category and per-size tables of each metric for each method ({name: [records per seed]} or
    {name: records}), with percentile bootstrap intervals over the refs of each group (two levels with
    several seeds)."""
    records_by_method = {name: list(side) if isinstance(side, (list, tuple)) else [side]
                         for name, side in records_by_method.items()}
    names = list(records_by_method)
    first = records_by_method[names[0]][0]
    for name in names:
        for i, records in enumerate(records_by_method[name]):
            check_comparable(first, records, f'{names[0]}[0]', f'{name}[{i}]')
    seeds = sorted({len(side) for side in records_by_method.values()})
    level = f'{100 * confidence:g} %'
    parts = [f"Breakdown: {first.meta.get('dataset')} {first.meta.get('split')} split, {len(first):,} sentences, "
             f"img_size {first.meta.get('img_size')}; {level} bootstrap intervals over the refs of each row "
             f"({resamples:,} resamples{'' if seeds == [1] else ', seeds then refs'}). Size: the target's "
             f"share of the image."]
    for metric in metrics:
        parts.append(group_table(records_by_method, category_groups(first), 'category', metric, confidence,
                                 resamples, seed))
    for metric in metrics:
        parts.append(group_table(records_by_method, size_groups(), 'size', metric, confidence, resamples, seed))
    return '\n\n'.join(parts) + '\n'
