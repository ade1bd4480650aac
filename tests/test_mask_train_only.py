"""mask_train_only.py and refer/splits.py (its machinery) on the real RRSIS-D refs (+ synthesized
instances) and on tiny inputs.

The real-refs split (ratios 10 30 50 70 90, seed 42) is built once per module (~3 s)."""
import functools
import json
import os
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import mask_train_only as mto
from refer import splits
from refer.refer import REFER, load_instances, load_refs
from utils import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'mask_train_only.py'
RATIOS = (10, 30, 50, 70, 90)
VIEWS = ('all', 'no-mask', 'mask')

# Per-category weak (masked) train refs in the authors' published files rrsisd-mask/refs(unc)-XX-mask.p
# (AHideoKuzeA/LRB-WREL, commit 3acd7d1; category id -> count); they did not publish 10 and 30.
AUTHORS_WEAK = {
    50: {0: 193, 1: 192, 2: 196, 3: 314, 4: 427, 5: 204, 6: 453, 7: 198, 8: 296, 9: 240, 10: 409,
         11: 71, 12: 396, 13: 318, 14: 154, 15: 208, 16: 166, 17: 244, 18: 935, 19: 471},
    70: {0: 270, 1: 268, 2: 274, 3: 440, 4: 598, 5: 285, 6: 634, 7: 277, 8: 414, 9: 336, 10: 572,
         11: 99, 12: 555, 13: 445, 14: 216, 15: 291, 16: 233, 17: 342, 18: 1309, 19: 660},
    90: {0: 347, 1: 345, 2: 352, 3: 566, 4: 769, 5: 367, 6: 816, 7: 357, 8: 532, 9: 432, 10: 736,
         11: 127, 12: 713, 13: 572, 14: 278, 15: 375, 16: 299, 17: 440, 18: 1683, 19: 848},
}


# ------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope='module')
def source(rrsisd_refs_root, shared_dir):
    data = rrsisd_refs_root / 'rrsisd'
    instances = load_instances(str(data / 'instances.json'))
    categories = json.loads((shared_dir / 'rrsisd' / 'categories.json').read_text())
    return {
        'root': rrsisd_refs_root,
        'refs': load_refs(str(data / 'refs(unc).p')),
        'instances': instances,
        'ann_category': {a['id']: a.get('category_id', a.get('categories_id')) for a in instances['annotations']},
        'names': {c['id']: c['name'] for c in categories},
    }


@pytest.fixture(scope='module')
def split_out(source, tmp_path_factory):
    out = tmp_path_factory.mktemp('split') / 'out'
    assert mto.main(['--refer_data_root', str(source['root']), '--output_dir', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def view_refs(split_out):
    """view_refs(ratio, view) -> refs list of that output file, each file read once."""
    return functools.cache(lambda ratio, view: load_refs(str(split_out / f'refs(unc)-{ratio}-{view}.p')))


@pytest.fixture(scope='module')
def view_anns(split_out):
    return functools.cache(
        lambda ratio, view: load_instances(str(split_out / f'instances-{ratio}-{view}.json'))['annotations'])


def expected_weak(train_categories, ratio):
    """The rule of the issue, written independently: floor(ratio x count), most frequent first."""
    counts = Counter(train_categories)
    remaining = ratio * len(train_categories) // 100
    expected = {}
    for cat, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        if remaining <= 0:
            break
        expected[cat] = min(max(1, ratio * count // 100), remaining, count)
        remaining -= expected[cat]
    return expected


# ------------------------------------------------------------------------------------------------
# real refs
def test_weak_counts_follow_rule_and_match_authors(source, split_out, view_refs):
    train = [r for r in source['refs'] if r['split'] == 'train']
    train_cats = [source['ann_category'][r['ann_id']] for r in train]
    summary = json.loads((split_out / 'summary.json').read_text())
    for ratio in RATIOS:
        weak = Counter(source['ann_category'][r['ann_id']]
                       for r in view_refs(ratio, 'mask') if r['split'] == 'train')
        assert dict(weak) == expected_weak(train_cats, ratio), ratio
        if ratio in AUTHORS_WEAK:
            assert dict(weak) == AUTHORS_WEAK[ratio], ratio
        reported = summary['ratios'][str(ratio)]['expressions']
        assert {name: c['weak'] for name, c in reported.items() if c['weak']} == \
            {source['names'][cat]: n for cat, n in weak.items()}


def test_authors_float_arithmetic():
    # the authors compute int(0.7 * 90) = 62 (0.7 * 90 = 62.99999...), not floor(63.0)
    assert splits.weak_count(70, 90) == 62
    assert splits.weak_count(50, 12181) == 6090
    assert splits.weak_count(90, 12181) == 10962


def test_budget_cap_and_ties_follow_instances_order():
    # 2 + 2 annotations, 25 %: budget int(0.25 * 4) = 1; the tie goes to the category met first
    # in instances.json, which takes max(1, int(0.25 * 2)) = 1 and exhausts the budget
    anns = [{'id': 1}, {'id': 2}, {'id': 3}, {'id': 4}]
    for first, second in ((7, 5), (5, 7)):
        category = {1: first, 2: second, 3: first, 4: second}
        plan = splits.plan_ratio(random.Random(0), 25, anns, category)
        assert plan.budget == 1 and plan.weak_per_category == {first: 1}
        assert len(plan.masked_ann_ids) == 1 and category[next(iter(plan.masked_ann_ids))] == first


def test_val_test_untouched(source, view_refs, view_anns):
    refs = source['refs']
    others = [r for r in refs if r['split'] == 'val'] + [r for r in refs if r['split'] == 'test']
    other_anns = {a['id'] for a in source['instances']['annotations']} - \
        {r['ann_id'] for r in refs if r['split'] == 'train'}
    src_anns = [a for a in source['instances']['annotations'] if a['id'] in other_anns]
    expected = pickle.dumps(others, protocol=4)
    for ratio in RATIOS:
        for view in VIEWS:
            got = [r for r in view_refs(ratio, view) if r['split'] != 'train']
            assert pickle.dumps(got, protocol=4) == expected, (ratio, view)
            if ratio in (10, 90):  # instances files are slower to read: two ratios suffice
                anns = [a for a in view_anns(ratio, view) if a['id'] in other_anns]
                assert sorted(anns, key=lambda a: a['id']) == sorted(src_anns, key=lambda a: a['id'])


def test_views_partition_train(source, view_refs, view_anns):
    train_ids = [r['ref_id'] for r in source['refs'] if r['split'] == 'train']
    for ratio in RATIOS:
        ids = {v: [r['ref_id'] for r in view_refs(ratio, v) if r['split'] == 'train'] for v in VIEWS}
        assert not set(ids['mask']) & set(ids['no-mask'])
        assert sorted(ids['mask'] + ids['no-mask']) == sorted(train_ids)
        assert ids['all'] == ids['no-mask'] + ids['mask']  # the authors' order
        if ratio not in (10, 90):
            continue
        anns = {v: {a['id'] for a in view_anns(ratio, v)} for v in VIEWS}
        assert anns['mask'] | anns['no-mask'] == anns['all']
        assert anns['mask'] & anns['no-mask'] == anns['all'] - set(train_ids)  # shared = val + test
        assert anns['mask'] & set(train_ids) == set(ids['mask'])


def test_weak_expressions_are_category_names(source, view_refs):
    by_id = {r['ref_id']: r for r in source['refs']}
    for ratio in (10, 90):
        changed = 0
        for ref in view_refs(ratio, 'all'):
            orig = by_id[ref['ref_id']]
            if ref['split'] != 'train' or ref == orig:
                continue
            changed += 1
            name = source['names'][source['ann_category'][ref['ann_id']]]
            assert {k: v for k, v in ref.items() if k != 'sentences'} == \
                {k: v for k, v in orig.items() if k != 'sentences'}
            for sent, orig_sent in zip(ref['sentences'], orig['sentences'], strict=True):
                assert sent['raw'] == name and sent['tokens'] == name.split()
                assert sent['sent'] == orig_sent['sent'] and sent['sent_id'] == orig_sent['sent_id']
        assert changed == sum(r['split'] == 'train' for r in view_refs(ratio, 'mask')) > 0
        assert all(r == by_id[r['ref_id']] for r in view_refs(ratio, 'no-mask'))


def test_seed_decides_the_split(source):
    inputs = splits.load_inputs(source['root'] / 'rrsisd' / 'refs(unc).p',
                             source['root'] / 'rrsisd' / 'instances.json')
    full = splits.plan_splits(inputs, RATIOS, seed=42)
    again = splits.plan_splits(inputs, RATIOS, seed=42)
    other = splits.plan_splits(inputs, RATIOS, seed=43)
    for a, b, c in zip(full, again, other):
        assert a.masked_ann_ids == b.masked_ann_ids and a.example_ann_ids == b.example_ann_ids
        assert a.masked_ann_ids != c.masked_ann_ids
        assert len(a.masked_ann_ids) == len(c.masked_ann_ids)
    # a ratio asked for alone draws what it draws in the authors' full 10..90 run
    assert splits.plan_splits(inputs, [90], seed=42)[0].masked_ann_ids == full[-1].masked_ann_ids
    assert splits.plan_splits(inputs, [20, 50], seed=42)[1].masked_ann_ids == full[2].masked_ann_ids


def test_output_roots_load_through_refer(source, split_out):
    n_train = sum(r['split'] == 'train' for r in source['refs'])
    n_weak = sum(AUTHORS_WEAK[90].values())
    expected_train = {'all': n_train, 'no-mask': n_train - n_weak, 'mask': n_weak}
    refers = {view: REFER(str(split_out / f'rrsisd-90-{view}'), 'rrsisd', 'unc') for view in VIEWS}
    for view, refer in refers.items():
        assert len(refer.getRefIds(split='train')) == expected_train[view]
        assert len(refer.getRefIds(split='val')) == 1740 and len(refer.getRefIds(split='test')) == 3481
        # the data root's files are the six files (hard links or copies)
        assert (split_out / f'rrsisd-90-{view}' / 'rrsisd' / 'refs(unc).p').read_bytes() == \
            (split_out / f'refs(unc)-90-{view}.p').read_bytes()
    refer = refers['mask']
    ref = refer.loadRefs(refer.getRefIds(split='train')[0])[0]
    assert ref['sentences'][0]['raw'] == refer.Cats[ref['category_id']]


# ------------------------------------------------------------------------------------------------
# tiny inputs: images link, overwrite, errors
def write_tiny_root(root, ann_category_key='categories_id', drop_ann=None, with_images=True):
    """6 train refs (cats 0, 0, 0, 1, 1, 2) + 1 val + 1 test, one annotation each."""
    cats = [0, 0, 0, 1, 1, 2, 0, 1]
    splits = ['train'] * 6 + ['val', 'test']
    refs = [{'image_id': i, 'split': s, 'file_name': f'{i:05d}.jpg', 'category_id': c, 'ann_id': i,
             'sent_ids': [i], 'ref_id': i,
             'sentences': [{'tokens': ['the', 'thing', str(i)], 'raw': f'the thing {i}', 'sent_id': i,
                            'sent': f'the thing {i}'}]}
            for i, (c, s) in enumerate(zip(cats, splits), start=1)]
    anns = [{'id': r['ann_id'], 'image_id': r['image_id'], ann_category_key: r['category_id'],
             'segmentation': [[1, 1, 9, 1, 9, 9, 1, 9]], 'bbox': [1, 1, 8, 8], 'area': 64.0, 'iscrowd': 0}
            for r in refs if r['ann_id'] != drop_ann]
    instances = {'images': [{'id': r['image_id'], 'file_name': r['file_name'], 'width': 16, 'height': 16}
                            for r in refs],
                 'annotations': anns,
                 'categories': [{'id': 0, 'name': 'ship'}, {'id': 1, 'name': 'storage tank'},
                                {'id': 2, 'name': 'dam'}]}
    (root / 'rrsisd').mkdir(parents=True)
    (root / 'rrsisd' / 'instances.json').write_text(json.dumps(instances))
    with open(root / 'rrsisd' / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    if with_images:
        (root / 'images' / 'rrsisd' / 'JPEGImages').mkdir(parents=True)
    return root


def test_images_link_and_overwrite(tmp_path, capsys):
    root = write_tiny_root(tmp_path / 'data')
    out = tmp_path / 'work' / 'out'
    args = ['--refer_data_root', str(root), '--output_dir', str(out), '--ratios', '50']
    assert mto.main(args) == 0
    link = out / 'rrsisd-50-mask' / 'images' / 'rrsisd'
    assert link.is_symlink() and os.path.isabs(os.readlink(link))
    assert link.resolve() == (root / 'images' / 'rrsisd').resolve()
    refs = load_refs(str(out / 'rrsisd-50-mask' / 'rrsisd' / 'refs(unc).p'))
    # 6 train: budget 3; cat 0 (3) -> 1, cat 1 (2) -> 1, cat 2 (1) -> max(1, 0) = 1
    assert sorted(r['sentences'][0]['tokens'] == r['sentences'][0]['raw'].split() for r in refs) == [True] * 5
    weak = sorted(r['sentences'][0]['raw'] for r in refs if r['split'] == 'train')
    assert weak == ['dam', 'ship', 'storage tank']
    assert 'acc/weak@50' in capsys.readouterr().out
    # the per-annotation JSON cache writes exactly what json.dumps writes
    inputs = splits.load_inputs(root / 'rrsisd' / 'refs(unc).p', root / 'rrsisd' / 'instances.json')
    views = splits.make_views(inputs, splits.plan_splits(inputs, [50], seed=42)[0])
    for view in VIEWS:
        assert (out / f'instances-50-{view}.json').read_text() == \
            json.dumps(views[view][1], separators=(',', ':'))

    (out / 'stale.txt').write_text('old')
    with pytest.raises(InputError, match='--overwrite'):
        mto.main(args)
    assert (out / 'stale.txt').exists()
    assert mto.main(args + ['--overwrite', '--seed', '1']) == 0
    assert not (out / 'stale.txt').exists() and (out / 'instances-50-all.json').is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ['out']  # no temp dirs left behind


def test_direct_input_files(tmp_path):
    root = write_tiny_root(tmp_path / 'data', with_images=False)
    out = tmp_path / 'out'
    assert mto.main(['--refer_data_root', str(tmp_path / 'elsewhere'), '--output_dir', str(out),
                     '--instances', str(root / 'rrsisd' / 'instances.json'),
                     '--refs', str(root / 'rrsisd' / 'refs(unc).p'), '--ratios', '10', '90']) == 0
    assert not (out / 'rrsisd-90-all' / 'images').exists()  # no source images: no link
    # 6 train annotations (3, 2, 1 per category): 10 % -> budget int(0.6) = 0, nothing weak;
    # 90 % -> budget 5: max(1, int(2.7)) = 2, then 1, then max(1, 0) = 1
    for ratio, n_weak in ((10, 0), (90, 4)):
        for view, n_train in (('mask', n_weak), ('no-mask', 6 - n_weak)):
            refer = REFER(str(out / f'rrsisd-{ratio}-{view}'), 'rrsisd', 'unc')
            assert len(refer.getRefIds(split='train')) == n_train


def test_same_seed_same_bytes(tmp_path):
    root = write_tiny_root(tmp_path / 'data')
    outs = [tmp_path / 'a', tmp_path / 'b']
    for out in outs:
        assert mto.main(['--refer_data_root', str(root), '--output_dir', str(out), '--seed', '3']) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob('*') if p.is_file())
    assert len(files) == 5 * 12 + 1  # 6 files + 3 roots x 2 links per ratio, summary.json
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)


@pytest.mark.parametrize('case', ['ratio_zero', 'ratio_100', 'no_category_key', 'missing_ann',
                                  'non_empty_out', 'missing_refs'])
def test_errors_one_line_nothing_written(tmp_path, case):
    root = write_tiny_root(tmp_path / 'data',
                           ann_category_key='label' if case == 'no_category_key' else 'categories_id',
                           drop_ann=3 if case == 'missing_ann' else None)
    out = tmp_path / 'work' / 'out'
    args = ['--refer_data_root', str(root), '--output_dir', str(out)]
    culprit = {'ratio_zero': '--ratios: 0', 'ratio_100': '--ratios: 100', 'no_category_key': 'annotation 1',
               'missing_ann': 'ref 3 points to annotation 3', 'non_empty_out': '--overwrite',
               'missing_refs': 'nope.p'}[case]
    if case == 'ratio_zero':
        args += ['--ratios', '10', '0']
    elif case == 'ratio_100':
        args += ['--ratios', '100']
    elif case == 'non_empty_out':
        out.mkdir(parents=True)
        (out / 'keep.txt').write_text('mine')
    elif case == 'missing_refs':
        args += ['--refs', str(tmp_path / 'nope.p')]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0] and 'error' in lines[0], proc.stderr
    if case == 'non_empty_out':
        assert [p.name for p in out.iterdir()] == ['keep.txt']
    else:
        assert not (tmp_path / 'work').exists()

