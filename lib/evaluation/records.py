"""Per-sentence evaluation records: what test.py measured, one row per sentence, in a small .npz file.

Columns (numpy, equal length, in the meter's order: dataset index, then sentence):
    ref_id int64, sentence int32 (index within its ref), category_id int32, is_weak bool (the sentence is
    just the class name), area int64 (target pixels at the evaluated size), pixels int64 (H*W at that size),
    I int64, U int64 (intersection and union of prediction and target)
plus `categories` (names, index = category id) and `meta` (dataset, split, img_size, checkpoint,
weights_key, model, swin_type). `summary(records)` gives test.py's printed metrics exactly.
"""
import json
import os
import zipfile

import numpy as np

from lib.files import atomic_file
from refer.check import category_id_of
from utils import InputError

COLUMNS = {'ref_id': np.int64, 'sentence': np.int32, 'category_id': np.int32, 'is_weak': np.bool_,
           'area': np.int64, 'pixels': np.int64, 'I': np.int64, 'U': np.int64}
META_KEYS = ('dataset', 'split', 'img_size', 'checkpoint', 'weights_key', 'model', 'swin_type')
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # as lib.training.metrics (not imported: it pulls in torch)


def records_path(results_json_path):
    """The records file test.py writes beside its metrics JSON: `<stem>_records.npz`."""
    return f'{os.path.splitext(str(results_json_path))[0]}_records.npz'


def breakdown_path(results_json_path):
    """The Markdown breakdown `test.py --breakdown` writes beside its metrics JSON: `<stem>_breakdown.md`."""
    return f'{os.path.splitext(str(results_json_path))[0]}_breakdown.md'


class SentenceRecords:
    """One row per evaluated sentence (see the module docstring); attributes are the columns."""

    def __init__(self, columns, categories, meta):
        lengths = {len(np.asarray(columns[name])) for name in COLUMNS}
        if len(lengths) != 1:
            raise ValueError(f'columns of unequal length: {sorted(lengths)}')
        for name, dtype in COLUMNS.items():
            setattr(self, name, np.asarray(columns[name], dtype=dtype))
        self.categories = [str(c) for c in categories]
        self.meta = dict(meta)
        self.source = None  # the file it was loaded from (names it in errors)

    def __len__(self):
        return len(self.ref_id)

    def columns(self):
        return {name: getattr(self, name) for name in COLUMNS}

    @property
    def share(self):
        """The target's share of the image (area / pixels), in [0, 1]."""
        return self.area / np.maximum(self.pixels, 1)

    def subset(self, mask):
        """The rows where `mask` (bool per row) holds, same categories and meta."""
        return SentenceRecords({k: v[mask] for k, v in self.columns().items()}, self.categories, self.meta)

    @classmethod
    def from_meter(cls, meter, dataset, meta):
        """From a reduced lib.training.metrics.RefSegMeter (records (key, I, U, area, pixels), key =
        (dataset index, sentence)) and the evaluated refer.dataset.ReferDataset."""
        rows = meter.records
        index = np.array([r[0][0] for r in rows], dtype=np.int64)
        sentence = np.array([r[0][1] for r in rows], dtype=np.int64)
        ref_ids = np.asarray(dataset.ref_ids, dtype=np.int64)
        refs = dataset.refer.Refs
        category_of_ref = np.array([category_id_of(refs[r]) for r in dataset.ref_ids], dtype=np.int64)
        offsets = np.asarray(dataset.offsets, dtype=np.int64)
        is_weak = np.asarray(dataset.is_weak, dtype=bool)
        cats = dataset.refer.Cats
        categories = [''] * (max(cats) + 1 if cats else 0)
        for cat_id, name in cats.items():
            categories[cat_id] = name
        columns = {'ref_id': ref_ids[index], 'sentence': sentence, 'category_id': category_of_ref[index],
                   'is_weak': is_weak[offsets[index] + sentence],
                   'I': [r[1] for r in rows], 'U': [r[2] for r in rows],
                   'area': [r[3] for r in rows], 'pixels': [r[4] for r in rows]}
        return cls(columns, categories, {k: meta.get(k) for k in META_KEYS})

    def save(self, path):
        """Write atomically (a reader never sees half a file): the columns, and categories and meta as JSON."""
        with atomic_file(path) as tmp:
            with open(tmp, 'wb') as f:  # a file object: np.savez would append '.npz' to the temporary name
                np.savez_compressed(f, **self.columns(), categories=np.array(json.dumps(self.categories)),
                                    meta=np.array(json.dumps(self.meta)))


def load_records(path):
    """SentenceRecords from a file of `save`; a missing, corrupt or incomplete file is a one-line InputError."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"records file '{path}': not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*COLUMNS, 'categories', 'meta') if k not in data.files]
            if missing:
                raise InputError(f"records file '{path}': no column {', '.join(missing)} "
                                 f'(not a file of test.py?)')
            columns = {k: data[k] for k in COLUMNS}
            categories = json.loads(str(data['categories']))
            meta = json.loads(str(data['meta']))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"records file '{path}': cannot be read ({type(e).__name__}: {e})") from None
    try:
        records = SentenceRecords(columns, categories, meta)
    except ValueError as e:
        raise InputError(f"records file '{path}': {e}") from None
    records.source = path
    return records


def sentence_ious(records):
    """IoU per sentence, as lib.training.metrics.sentence_iou: I / U, and 0 when I or U is 0."""
    inter, union = records.I, records.U
    return np.where((inter > 0) & (union > 0), inter / np.maximum(union, 1), 0.0)


def summary(records):
    """RefSegMeter.summary() of the same sentences, with the same arithmetic (so the same floats)."""
    n = len(records)
    cum_i, cum_u = int(records.I.sum()), int(records.U.sum())
    ious = sentence_ious(records)
    result = {'oIoU': 100.0 * cum_i / cum_u if cum_u > 0 else 0.0,
              'mIoU': 100.0 * float(ious.mean()) if n else 0.0}
    for t in PREC_THRESHOLDS:
        result[f'precision@{t}'] = 100.0 * float((ious >= t).sum()) / n if n else 0.0
    result.update(num_sentences=n, cum_I=cum_i, cum_U=cum_u)
    return result


def check_comparable(a, b, name_a='A', name_b='B'):
    """One-line InputError unless `a` and `b` evaluated the same sentences of the same split at the same size."""
    for key in ('dataset', 'split', 'img_size'):
        if a.meta.get(key) != b.meta.get(key):
            raise InputError(f'{name_a} and {name_b} are not comparable: {key} {a.meta.get(key)!r} '
                             f'vs {b.meta.get(key)!r}')
    rows_a, rows_b = _sorted_rows(a), _sorted_rows(b)
    if rows_a.shape == rows_b.shape and (rows_a == rows_b).all():
        return
    only_a = _first_row_missing(rows_a, rows_b)
    only_b = _first_row_missing(rows_b, rows_a)
    if only_a is not None and (only_b is None or tuple(only_a) <= tuple(only_b)):
        where = f'ref {only_a[0]} (sentence {only_a[1]}) is in {name_a} only'
    else:
        where = f'ref {only_b[0]} (sentence {only_b[1]}) is in {name_b} only'
    raise InputError(f'{name_a} and {name_b} are not comparable: different sentences ({len(a)} vs {len(b)}); '
                     f'{where}')


def _sorted_rows(records):
    rows = np.stack([records.ref_id, records.sentence.astype(np.int64)], 1)
    return rows[np.lexsort((rows[:, 1], rows[:, 0]))]


def _first_row_missing(rows, others):
    """The first of `rows` (sorted) not in `others`, or None."""
    others = {tuple(r) for r in others.tolist()}
    for row in rows.tolist():
        if tuple(row) not in others:
            return row
    return None
