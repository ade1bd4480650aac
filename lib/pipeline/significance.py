"""How far the table can be trusted: each cell's 95 % interval and, per share, the paired differences the
paper's claims rest on (Naive-WREL - Only Accurate, LRB-WREL - Naive-WREL), computed by lib.evaluation from
test.py's per-sentence records; and breakdown.md, each method per category and per object size.

The table is rewritten after every test, so what is computed is kept in intervals.json, keyed by the
records' contents and the settings: a rewrite recomputes only what a new test changed."""
import json
import math

from lib import files
from lib.evaluation.breakdown import breakdown_markdown
from lib.evaluation.compare import format_value, interval, paired_difference
from lib.evaluation.records import load_records, summary
from utils import InputError

from .config import COLUMNS, FULL_METHOD, METHODS, ratio_tag
from .manifests import file_digest, read_json, write_json

CONFIDENCE = 0.95
RESAMPLES = 10000
SEED = 0  # the bootstrap's and the permutation test's: the same records give the same table
# (later method, earlier method): the gain of WREL's class names, then the gain of LRB beyond them
DIFFERENCES = (('naive-wrel', 'only-accurate'), ('lrb-wrel', 'naive-wrel'))
CACHE_FILE = 'intervals.json'
BREAKDOWN_FILE = 'breakdown.md'
PLOT_FILE = 'scores.png'
LABELS = dict(METHODS + (FULL_METHOD,))
METHOD_TEXT = ("bootstrap over the split's refs (a ref's sentences are resampled together; with several training "
               'seeds, seeds first, then refs); differences paired: the same refs for both methods in each '
               'resample; p-value: paired permutation test (the two methods swapped per ref)')
DIFFERENCES_HEAD = ('Differences on the same refs (the 95 % interval of a paired bootstrap over refs; p: a paired '
                    'permutation test; **bold**: the interval excludes 0):')


def interval_note(seeds):
    """The table's note on what its brackets mean."""
    over = ('1 training seed per method, it shows how far the score would move on another test set of this '
            "size, not how far it moves between training seeds" if seeds == 1 else
            f'{seeds} training seeds per method (the cell is their mean), it covers both the test set and the '
            'seeds')
    return (f"In brackets: each cell's 95 % interval, a bootstrap over the split's refs ({RESAMPLES:,} resamples, "
            f"seed {SEED}) from test.py's per-sentence records (results/*_records.npz); with {over}. "
            f'Per category and object size: {BREAKDOWN_FILE}; test oIoU with intervals: {PLOT_FILE}.')


def settings():
    return {'confidence': CONFIDENCE, 'resamples': RESAMPLES, 'seed': SEED}


class Records:
    """The record files of the pipeline's tests, each read and digested at most once; what was computed
    from them, kept in intervals.json across rewrites of the table."""

    def __init__(self, plan):
        self.plan = plan
        self.path = plan.cfg.out / CACHE_FILE
        self.cache = read_json(self.path) or {}
        self.changed = False
        self._digests, self._loaded = {}, {}

    def files(self, share, method, split):
        return self.plan.records_files(share, method, split)

    def digests(self, paths):
        """Each file's content digest; InputError naming the first missing one."""
        out = []
        for p in paths:
            if p not in self._digests:
                if not p.is_file():
                    raise InputError(f'no records file {p}')
                self._digests[p] = file_digest([p])
            out.append(self._digests[p])
        return out

    def load(self, paths):
        for p in paths:
            if p not in self._loaded:
                self._loaded[p] = load_records(p)
        return [self._loaded[p] for p in paths]

    def cached(self, key, compute):
        """compute() once per key; an InputError (missing or mismatched records) is kept as {'error': line}."""
        k = json.dumps(key, sort_keys=True)
        if k not in self.cache:
            try:
                self.cache[k] = compute()
            except InputError as e:
                self.cache[k] = {'error': str(e)}
            self.changed = True
        return self.cache[k]

    def save(self):
        if self.changed:
            write_json(self.path, self.cache)
            self.changed = False


def _guard(fn):
    """fn() or {'error': line} when a records file is missing or unreadable."""
    try:
        return fn()
    except InputError as e:
        return {'error': str(e)}


def cell_interval(records, share, method, column):
    """{value, low, high, seeds (each seed's value)} of one cell, or {'error': ...}."""
    metric, split = column
    paths = records.files(share, method, split)

    def compute():
        runs = records.load(paths)
        out = interval(runs, metric=metric, confidence=CONFIDENCE, resamples=RESAMPLES, seed=SEED)
        return {'value': float(out['value']), 'low': _number(out['low']), 'high': _number(out['high']),
                'seeds': [float(summary(r)[metric]) for r in runs]}

    return _guard(lambda: records.cached({'kind': 'interval', 'metric': metric, 'records': records.digests(paths),
                                          **settings()}, compute))


def difference(records, share, later, earlier, column):
    """later - earlier on one column, paired over the same refs: {diff, low, high, p_value, excludes_zero}."""
    metric, split = column
    a, b = records.files(share, later, split), records.files(share, earlier, split)

    def compute():
        out = paired_difference(records.load(a), records.load(b), metric=metric, confidence=CONFIDENCE,
                                resamples=RESAMPLES, seed=SEED)
        return {'diff': float(out['diff']), 'low': _number(out['low']), 'high': _number(out['high']),
                'p_value': _number(out['p_value']), 'excludes_zero': bool(out['excludes_zero'])}

    return _guard(lambda: records.cached({'kind': 'difference', 'metric': metric, 'a': records.digests(a),
                                          'b': records.digests(b), **settings()}, compute))


def _number(x):
    """A float, or None for NaN (lib.evaluation's 'no interval' with fewer than 2 refs; JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def column_key(column):
    metric, split = column
    return f'{metric}_{split}'


def differences(records, shares, have):
    """Per share (not the 100 % row), the two paired differences on every column where both cells exist
    (have(share, method label, column key)); None where one is missing."""
    out = []
    for share in shares:
        for later, earlier in DIFFERENCES:
            entry = {'ratio': share, 'later': LABELS[later], 'earlier': LABELS[earlier],
                     'label': f'{LABELS[later]} − {LABELS[earlier]}'}
            for c in COLUMNS:
                k = column_key(c)
                both = have(share, LABELS[later], k) and have(share, LABELS[earlier], k)
                entry[k] = difference(records, share, later, earlier, c) if both else None
            out.append(entry)
    return out


def format_interval(iv):
    """'[14.02, 18.71]'; '' without one."""
    if not iv or iv.get('low') is None:
        return ''
    return f"[{iv['low']:.2f}, {iv['high']:.2f}]"


def format_difference(d):
    """'+3.34 [+0.52, +6.20] p=0.020', bold when the interval excludes 0; '–' without one."""
    if not d or 'error' in d:
        return '–'
    if d['low'] is None:
        return f"{d['diff']:+.2f}"
    p = 'p<0.001' if d['p_value'] < 0.001 else f"p={d['p_value']:.3f}"
    text = f"{format_value(d['diff'], d['low'], d['high'], signed=True)} {p}"
    return f'**{text}**' if d['excludes_zero'] else text


def differences_markdown(entries):
    heads = ['Ratio', 'Difference'] + [f'{m} {s.capitalize()}' for m, s in COLUMNS]
    lines = ['| ' + ' | '.join(heads) + ' |', '|' + '|'.join('-' * (len(h) + 2) for h in heads) + '|']
    previous = None
    for e in entries:
        ratio = f"{ratio_tag(e['ratio'])}%" if e['ratio'] != previous else ''
        previous = e['ratio']
        cells = [format_difference(e[column_key(c)]) for c in COLUMNS]
        lines.append(f"| {ratio:<5} | {e['label']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def errors(rows, entries):
    """The distinct one-line reasons an interval or a difference is missing."""
    seen = []
    for item in [iv for r in rows for iv in r.get('intervals', {}).values()] + \
            [v for e in entries for v in e.values() if isinstance(v, dict)]:
        if isinstance(item, dict) and 'error' in item and item['error'] not in seen:
            seen.append(item['error'])
    return seen


def write_breakdown(plan):
    """breakdown.md: per share, each method's test scores per category and per object size, with their
    intervals (lib.evaluation.breakdown). Shares whose records are missing are left out with a line."""
    records = Records(plan)
    sections = []
    for share in plan.shares():
        methods = [FULL_METHOD[0]] if share == 100.0 else [key for key, _ in METHODS]
        paths = {LABELS[m]: records.files(share, m, 'test') for m in methods}

        def compute(paths=paths):
            return {'markdown': breakdown_markdown({label: records.load(p) for label, p in paths.items()},
                                                   confidence=CONFIDENCE, resamples=RESAMPLES, seed=SEED)}

        got = _guard(lambda: records.cached({'kind': 'breakdown', 'records': {k: records.digests(p) for k, p in
                                                                              paths.items()}, **settings()}, compute))
        title = f'## {ratio_tag(share)} % accurate expressions: test split'
        sections.append(f"{title}\n\n{got.get('markdown') or 'No breakdown: ' + got['error']}\n")
    records.save()
    path = plan.cfg.out / BREAKDOWN_FILE
    files.write_text_atomic(path, f'# {plan.cfg.args.dataset}: each method per category and per object size\n\n'
                            + '\n'.join(sections))
    return path
