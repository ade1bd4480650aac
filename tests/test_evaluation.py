"""lib/evaluation: test.py's per-sentence records give its printed metrics exactly; bootstrap intervals over
refs (degenerate for a method against itself, covering a difference known by construction in about 95 %
of draws, two levels for seeds), the permutation p-value and the ref bootstrap against scipy.stats, the
breakdowns, and one-line errors for records that cannot be compared."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

import utils
from bert.encoder import load_tokenizer
from lib.evaluation import breakdown, compare
from lib.evaluation.records import (PREC_THRESHOLDS, SentenceRecords, breakdown_path, check_comparable,
                                    load_records, records_path, summary)
from lib.training import distributed, metrics
from refer.dataset import build_dataset
from test_train_cli import METRIC_KEYS, common_args, load_script, read_metrics, train_args
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
META = {'dataset': 'rrsisd', 'split': 'test', 'img_size': 64, 'checkpoint': 'x.pth', 'weights_key': 'model',
        'model': 'lavt', 'swin_type': 'nano'}
pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def make_records(inter, union, ref_id=None, area=None, category_id=None, pixels=64 * 64, **meta):
    n = len(inter)
    ref_id = np.arange(n) if ref_id is None else np.asarray(ref_id)
    sentence = np.zeros(n, dtype=np.int64)
    for r in np.unique(ref_id):  # number the sentences within each ref
        sentence[ref_id == r] = np.arange((ref_id == r).sum())
    columns = {'ref_id': ref_id, 'sentence': sentence,
               'category_id': np.zeros(n) if category_id is None else category_id,
               'is_weak': np.zeros(n, dtype=bool), 'area': np.full(n, 100) if area is None else area,
               'pixels': np.full(n, pixels), 'I': inter, 'U': union}
    return SentenceRecords(columns, ['ship', 'dam', 'golffield'], {**META, **meta})


def paired_population(rng, n_refs, quality_a, quality_b):
    """Records of A and B on n_refs refs of 1-3 sentences. Per ref: a union U and a difficulty z ~ Beta(2, 2)
    shared by A and B (so they are correlated, as two models on one test set); per sentence I ~ Binomial(U,
    quality * z). Expected oIoU and mIoU: 100 * quality * E[z] = 50 * quality, so the true A - B is
    50 * (quality_a - quality_b)."""
    sentences = rng.integers(1, 4, n_refs)
    ref_id = np.repeat(np.arange(n_refs), sentences)
    union = np.repeat(rng.integers(50, 2000, n_refs), sentences)
    z = np.repeat(rng.beta(2, 2, n_refs), sentences)
    return [make_records(rng.binomial(union, q * z), union, ref_id) for q in (quality_a, quality_b)]


# --- records: exactly test.py's numbers -------------------------------------------------------------------

@pytest.fixture(scope='module')
def tested(demo_root, small_bert_dir, tmp_path_factory):
    """One epoch of train.py, then test.py --breakdown on its checkpoint, both through their real main."""
    out = tmp_path_factory.mktemp('evaluation')
    load_script('train.py').main(train_args(demo_root, small_bert_dir, out, 1))
    test_script = load_script('test.py')
    argv = common_args(demo_root, small_bert_dir) + ['--resume', str(out / 'model_last_demo.pth'), '--split', 'test']
    printed = test_script.main(argv + ['--breakdown'])
    return out / 'model_last_demo_rrsisd_test_metrics.json', printed, test_script, argv


def test_records_reproduce_the_printed_metrics(tested, demo_root, small_bert_dir):
    json_path, printed, _, _ = tested
    written = read_metrics(json_path)
    records = load_records(records_path(json_path))
    assert summary(records) == printed == {k: written[k] for k in METRIC_KEYS}
    assert 0 < printed['oIoU'] < 100 and 0 < printed['mIoU'] < 100  # a real checkpoint, not all-zero
    assert [(int(i), int(u)) for i, u in zip(records.I, records.U)] == [
        (s['I'], s['U']) for s in written['sentences']]
    assert records.meta == {k: written[k] for k in META}

    # rows against the data: ref ids, categories and target areas at the evaluated size
    args = utils.get_parser().parse_args(common_args(demo_root, small_bert_dir))
    dataset = build_dataset(args, 'test', load_tokenizer(str(small_bert_dir)), eval_mode=True)
    assert sorted(records.ref_id.tolist()) == sorted(dataset.ref_ids)
    for row in range(len(records)):
        ref_id = int(records.ref_id[row])
        item = dataset[dataset.ref_ids.index(ref_id)]
        assert records.area[row] == int(item['target'].sum()) > 0
        assert records.pixels[row] == item['target'].numel() == 64 * 64
        assert records.categories[records.category_id[row]] == dataset.refer.category_name(
            dataset.refer.Refs[ref_id])
        assert records.is_weak[row] == bool(item['is_weak'][records.sentence[row]])


def test_breakdown_file_and_output_guard(tested):
    json_path, printed, test_script, argv = tested
    text = Path(breakdown_path(json_path)).read_text()
    assert '#### oIoU per category' in text and '#### mIoU per size' in text
    assert f"| **all** | {printed['num_sentences']} | {printed['oIoU']:.2f} [" in text
    # the records file is guarded like the JSON: no silent overwrite of an earlier evaluation
    json_path.rename(json_path.with_suffix('.bak'))
    try:
        with pytest.raises(InputError, match=r'_records\.npz: exists; pass --overwrite'):
            test_script.main(argv)
    finally:
        json_path.with_suffix('.bak').rename(json_path)


def test_summary_matches_the_meter_on_many_sentences():
    """RefSegMeter.summary and summary(records) on 2,000 random sentences: the same floats, bit for bit."""
    rng = np.random.default_rng(0)
    n, side = 2000, 8
    gt = torch.from_numpy(rng.random((n, side, side)) < rng.random((n, 1, 1)))
    logits = torch.from_numpy(rng.standard_normal((n, 2, side, side)))
    meter = metrics.RefSegMeter()
    keys = [(i // 2, i % 2) for i in range(n)]  # refs of 2 sentences
    meter.update(logits, gt.long(), keys)
    dataset = SimpleNamespace(ref_ids=list(range(100, 100 + n // 2)), offsets=list(range(0, n + 1, 2)),
                              is_weak=torch.arange(n) % 3 == 0,
                              refer=SimpleNamespace(Refs={100 + r: {'category_id': r % 4} for r in range(n // 2)},
                                                    Cats={0: 'a', 1: 'b', 2: 'c', 3: 'd'}))
    records = SentenceRecords.from_meter(meter, dataset, META)
    assert summary(records) == meter.summary()
    assert records.area.tolist() == gt.flatten(1).sum(1).tolist() and set(records.pixels.tolist()) == {side ** 2}
    assert records.ref_id[:4].tolist() == [100, 100, 101, 101] and records.category_id[:4].tolist() == [0, 0, 1, 1]
    assert records.is_weak[:4].tolist() == [True, False, False, True]
    assert PREC_THRESHOLDS == metrics.PREC_THRESHOLDS


def test_meter_keeps_area_and_pixels_through_the_reduction(monkeypatch):
    gt = torch.zeros(4, 3, 5, dtype=torch.long)
    for k in range(4):
        gt[k].view(-1)[:k + 1] = 1  # areas 1..4
    logits = torch.randn(4, 2, 3, 5)
    shards = []
    for rank in range(2):
        m = metrics.RefSegMeter()
        m.update(logits[rank::2], gt[rank::2], [(k, 0) for k in range(rank, 4, 2)])
        shards.append(m.records)
    monkeypatch.setattr(distributed, 'all_gather_objects', lambda obj: shards)
    reduced = metrics.RefSegMeter().reduce().records
    assert [(key, area, pixels) for key, _, _, area, pixels in reduced] == [((k, 0), k + 1, 15) for k in range(4)]


def test_save_load_round_trip(tmp_path):
    a = make_records([3, 0, 5], [4, 6, 5], ref_id=[7, 7, 9], area=[10, 20, 30], category_id=[2, 2, 1])
    a.save(tmp_path / 'a.npz')
    b = load_records(tmp_path / 'a.npz')
    assert {k: v.tolist() for k, v in b.columns().items()} == {k: v.tolist() for k, v in a.columns().items()}
    assert {k: v.dtype for k, v in b.columns().items()} == {k: v.dtype for k, v in a.columns().items()}
    assert b.categories == a.categories and b.meta == a.meta and b.source == str(tmp_path / 'a.npz')
    assert [p.name for p in tmp_path.iterdir()] == ['a.npz']  # no temporary left
    assert records_path('/r/m_rrsisd_test_metrics.json') == '/r/m_rrsisd_test_metrics_records.npz'


# --- intervals ------------------------------------------------------------------------------------------

def test_ref_table_sums_sentences_per_ref():
    a = make_records([3, 0, 5, 2], [4, 6, 5, 2], ref_id=[9, 7, 7, 9])
    table = compare.ref_table(a)
    assert table.ref_ids.tolist() == [7, 9]
    col = {name: table.sums[:, i].tolist() for i, name in enumerate(compare.TABLE_COLUMNS)}
    assert col['I'] == [5, 5] and col['U'] == [11, 6] and col['sentences'] == [2, 2]
    assert col['iou_sum'] == [1.0, 1.75] and col['hits@0.9'] == [1, 1] and col['hits@0.7'] == [1, 2]
    for metric in ('oIoU', 'precision@0.5', 'precision@0.8'):  # ratios of integer sums: exact
        assert compare.metric_from_sums(table.sums.sum(0), metric) == summary(a)[metric]


def test_a_method_against_itself():
    rng = np.random.default_rng(1)
    a, _ = paired_population(rng, 300, 0.8, 0.8)
    copy = SentenceRecords(a.columns(), a.categories, a.meta)
    for metric in ('oIoU', 'mIoU', 'precision@0.5'):
        d = compare.paired_difference(a, copy, metric, resamples=2000)
        assert d == {'diff': 0.0, 'low': 0.0, 'high': 0.0, 'p_value': 1.0, 'excludes_zero': False}
        iv = compare.interval([a], metric, resamples=2000)
        assert iv['low'] < iv['value'] < iv['high'] and iv['value'] == summary(a)[metric]


def test_a_clear_difference_excludes_zero():
    rng = np.random.default_rng(2)
    a, b = paired_population(rng, 300, 0.8, 0.6)
    d = compare.paired_difference(a, b, 'oIoU', resamples=2000)
    assert d['diff'] == pytest.approx(summary(a)['oIoU'] - summary(b)['oIoU'])
    assert 0 < d['low'] < d['diff'] < d['high'] and d['excludes_zero'] and d['p_value'] < 0.001
    reverse = compare.paired_difference(b, a, 'oIoU', resamples=2000)
    assert reverse['high'] < 0 and reverse['excludes_zero']


def test_coverage_of_a_known_difference():
    """200 paired test sets drawn from one population whose oIoU and mIoU differ by exactly 5 points:
    the 95 % interval of each draw covers 5 in about 95 % of them (191 and 193 of 200 here; resampling
    sentences instead of refs, blind to what a ref's sentences share, covers it in 166 and 175)."""
    rng = np.random.default_rng(12345)
    truth = 50 * (0.8 - 0.7)
    covered = {'oIoU': 0, 'mIoU': 0}
    draws = 200
    for draw in range(draws):
        a, b = paired_population(rng, 100, 0.8, 0.7)
        for metric in covered:
            d = compare.paired_difference(a, b, metric, resamples=1000, seed=draw)
            covered[metric] += d['low'] <= truth <= d['high']
    for metric, hits in covered.items():
        assert 0.90 <= hits / draws <= 0.99, (metric, hits)


def test_permutation_p_value_and_bootstrap_agree_with_scipy():
    rng = np.random.default_rng(3)
    a, b = paired_population(rng, 40, 0.8, 0.79)
    sums_a, sums_b = compare.ref_table(a).sums, compare.ref_table(b).sums
    stacked = np.concatenate([sums_a, sums_b])

    def oiou_difference(x, y, axis=-1):
        return compare.metric_from_sums(stacked[x].sum(-2), 'oIoU') - compare.metric_from_sums(
            stacked[y].sum(-2), 'oIoU')
    n = len(sums_a)
    reference = scipy.stats.permutation_test((np.arange(n), np.arange(n, 2 * n)), oiou_difference,
                                             permutation_type='samples', vectorized=True, n_resamples=20000,
                                             random_state=0).pvalue
    ours = compare.paired_difference(a, b, 'oIoU', resamples=20000)
    assert 0.01 < reference < 0.9 and ours['p_value'] == pytest.approx(reference, abs=0.02)

    def paired_oiou_difference(refs, axis=-1):
        return oiou_difference(refs, refs + n)
    ci = scipy.stats.bootstrap((np.arange(n),), paired_oiou_difference, vectorized=True, n_resamples=20000,
                               method='percentile', random_state=0).confidence_interval
    width = ci.high - ci.low
    assert ours['low'] == pytest.approx(ci.low, abs=0.05 * width)
    assert ours['high'] == pytest.approx(ci.high, abs=0.05 * width)


def test_seeds_two_levels():
    rng = np.random.default_rng(4)
    base, _ = paired_population(rng, 200, 0.8, 0.8)
    # identical seeds: the seed level adds nothing, the interval is the ref bootstrap's
    one = compare.interval([base], resamples=2000)
    three = compare.interval([base, base, base], resamples=2000)
    assert three == pytest.approx(one, rel=1e-12)
    # seeds that disagree: the value is their mean, and the interval is wider than any one seed's
    seeds = [SentenceRecords({**base.columns(), 'I': base.I * f // 100}, base.categories, base.meta)
             for f in (60, 80, 100)]
    spread = compare.interval(seeds, resamples=2000)
    assert spread['value'] == pytest.approx(np.mean([summary(s)['oIoU'] for s in seeds]))
    widths = [(lambda r: r['high'] - r['low'])(compare.interval([s], resamples=2000)) for s in seeds]
    assert spread['high'] - spread['low'] > 1.5 * max(widths)
    d = compare.paired_difference(seeds, [base], resamples=2000)
    assert d['diff'] == pytest.approx(spread['value'] - one['value'])


# --- one-line errors --------------------------------------------------------------------------------------

def test_records_that_cannot_be_compared_are_one_line_errors():
    a = make_records([1, 2, 3], [4, 4, 4], ref_id=[5, 6, 8])
    for other, message in [(make_records([1, 2, 3], [4, 4, 4], ref_id=[5, 6, 8], split='val'),
                            "split 'test' vs 'val'"),
                           (make_records([1, 2, 3], [4, 4, 4], ref_id=[5, 6, 8], img_size=480),
                            'img_size 64 vs 480'),
                           (make_records([1, 2, 3], [4, 4, 4], ref_id=[5, 7, 8]),
                            r'ref 6 \(sentence 0\) is in a.npz only'),
                           (make_records([1, 2, 3, 4], [4, 4, 4, 4], ref_id=[5, 6, 6, 8]),
                            r'\(3 vs 4\); ref 6 \(sentence 1\) is in b.npz only')]:
        with pytest.raises(InputError, match=message) as err:
            check_comparable(a, other, 'a.npz', 'b.npz')
        assert '\n' not in str(err.value)
        with pytest.raises(InputError, match='not comparable'):
            compare.paired_difference(a, other)
    with pytest.raises(InputError, match="metric 'IoU'"):
        compare.interval([a], 'IoU')


def test_unreadable_records_files(tmp_path):
    (tmp_path / 'text.npz').write_text('not a zip')
    np.savez(tmp_path / 'partial.npz', I=np.zeros(3))
    for name, message in [('missing.npz', 'not found'), ('text.npz', 'cannot be read'),
                          ('partial.npz', 'no column ref_id, sentence')]:
        with pytest.raises(InputError, match=f"records file '.*{name}': {message}") as err:
            load_records(tmp_path / name)
        assert '\n' not in str(err.value)


def test_compare_command(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a, b = paired_population(rng, 100, 0.8, 0.7)
    for name, records in [('a.npz', a), ('b.npz', b), ('a1.npz', a), ('b1.npz', b)]:
        records.save(tmp_path / name)
    make_records(b.I, b.U, b.ref_id, split='val').save(tmp_path / 'val.npz')

    compare.main([str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz'), '--names', 'LRB', 'Naive', '--resamples', '500'])
    out = capsys.readouterr().out
    assert '| metric | LRB | Naive | LRB − Naive | p |' in out
    d = compare.paired_difference(a, b, 'oIoU', resamples=500)
    assert f"| oIoU | {summary(a)['oIoU']:.2f} [" in out and f"{d['diff']:+.2f} [{d['low']:+.2f}, " in out
    compare.main(['--a', str(tmp_path / 'a.npz'), str(tmp_path / 'a1.npz'), '--b', str(tmp_path / 'b.npz'),
                  str(tmp_path / 'b1.npz'), '--metrics', 'mIoU', '--resamples', '200'])
    assert 'A (2 files (seeds)) vs B (2 files (seeds))' in capsys.readouterr().out

    # what a user sees: one line, exit status 2, no traceback
    proc = subprocess.run([sys.executable, '-m', 'lib.evaluation.compare', str(tmp_path / 'a.npz'),
                           str(tmp_path / 'val.npz')], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip() == (f"compare.py: error: {tmp_path / 'a.npz'} and {tmp_path / 'val.npz'} are not "
                                   f"comparable: split 'test' vs 'val'")


# --- breakdowns -----------------------------------------------------------------------------------------

def test_size_bins_and_breakdown_tables():
    shares = np.array([0.0, 0.0099, 0.01, 0.0999, 0.1, 1.0])
    records = make_records(np.ones(6), np.full(6, 2), area=(shares * 10000).astype(int), pixels=10000)
    assert breakdown.size_bin(records).tolist() == [0, 0, 1, 1, 2, 2]

    rng = np.random.default_rng(6)
    a, b = paired_population(rng, 60, 0.8, 0.7)
    n = len(a)
    area = np.where(np.arange(n) % 2 == 0, 50, 500)  # small (1.2 %) or medium (12 %) of 64 x 64: no 'large'
    category = np.where(a.ref_id < 20, 0, 2)
    a, b = (SentenceRecords({**r.columns(), 'area': area, 'category_id': category}, r.categories, r.meta)
            for r in (a, b))
    text = breakdown.breakdown_markdown({'LRB': [a], 'Naive': [b]}, resamples=500)
    small = a.subset(area == 50)
    got = compare.interval([small], 'oIoU', resamples=500)
    assert f"| small (< 1 %) | {len(small)} | {compare.format_value(got['value'], got['low'], got['high'])} |" \
        not in text  # 50 / 4096 = 1.2 %: medium, not small
    assert f'| medium (1–10 %) | {len(small)} | ' in text and f'| large (≥ 10 %) | {n - len(small)} | ' in text
    assert '| small (< 1 %) | 0 | — | — |' in text
    ship = a.subset(a.category_id == 0)
    got = compare.interval([ship], 'mIoU', resamples=500)
    assert f"| ship | {len(ship)} | {compare.format_value(got['value'], got['low'], got['high'])} | " in text
    assert '| golffield |' in text and '| dam |' not in text  # categories present only
    full = compare.interval([b], 'oIoU', resamples=500)
    assert f"| {compare.format_value(full['value'], full['low'], full['high'])} |\n" in text  # Naive's 'all' row
