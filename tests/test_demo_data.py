"""Generated demo data: RRSIS-D layout and formats, determinism, and targets placed where their
(real) expressions say."""
import filecmp
import json
import pickle
from collections import Counter

import numpy as np
import pytest

from refer.demo_data import (CLASS_WORDS, RRSISD_CATEGORIES, Region, generate, parse_position, parse_size,
                             render_scene, split_names, template_expressions)
from refer.refer import REFER, load_refs
from utils import InputError

ALL = frozenset(range(3))


def test_layout_and_formats(demo_root):
    refs_file = demo_root / 'rrsisd' / 'refs(unc).p'
    instances = json.loads((demo_root / 'rrsisd' / 'instances.json').read_text())
    refs = load_refs(str(refs_file))
    assert len(refs) == len(instances['images']) == len(instances['annotations']) == 40
    assert Counter(r['split'] for r in refs) == Counter(split_names(40)) == {'train': 28, 'val': 4, 'test': 8}
    assert [c['name'] for c in instances['categories']] == RRSISD_CATEGORIES
    assert [c['id'] for c in instances['categories']] == list(range(20))
    for ref in refs:
        assert ref['ref_id'] == ref['ann_id'] == ref['image_id']
        assert len(ref['sentences']) == 1 and ref['sent_ids'] == [ref['sentences'][0]['sent_id']]
        assert set(ref['sentences'][0]) == {'raw', 'sent', 'tokens', 'sent_id'}
        assert (demo_root / 'images' / 'rrsisd' / 'JPEGImages' / ref['file_name']).is_file()
    for ann in instances['annotations']:
        assert 'categories_id' in ann and 'category_id' not in ann
        assert isinstance(ann['segmentation'], list) and len(ann['segmentation'][0]) % 2 == 0
        assert len(ann['bbox']) == 4 and ann['area'] > 0
    assert {r['category_id'] for r in refs} == set(range(20))  # every class appears


def test_refer_reads_demo_and_masks_match_boxes(demo_root):
    refer = REFER(str(demo_root), 'rrsisd', 'unc')
    for ref in refer.Refs.values():
        m = refer.getMask(ref)
        assert m['mask'].shape == (64, 64) and m['area'] == refer.refToAnn[ref['ref_id']]['area']
        x, y, w, h = refer.getRefBox(ref['ref_id'])
        ys, xs = np.nonzero(m['mask'])
        assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h


def test_targets_lie_where_expressions_say(demo_root):
    refer = REFER(str(demo_root), 'rrsisd', 'unc')
    for ref in refer.Refs.values():
        raw = ref['sentences'][0]['raw']
        region = parse_position(raw)
        assert region is not None, raw
        ys, xs = np.nonzero(refer.getMask(ref)['mask'])
        assert region.contains(xs.mean(), ys.mean(), 64), (ref['ref_id'], raw)


def test_expressions_are_real_rrsisd_ones(demo_root, shared_dir):
    real = {s['raw'] for r in load_refs(str(shared_dir / 'rrsisd' / 'refs(unc).p')) for s in r['sentences']}
    refs = load_refs(str(demo_root / 'rrsisd' / 'refs(unc).p'))
    assert all(r['sentences'][0]['raw'] in real for r in refs)


def test_class_words_match_real_expressions(shared_dir):
    # category ids of the real refs map to the names of categories.json: expressions of class c
    # mostly spell the class as CLASS_WORDS[c]
    refs = load_refs(str(shared_dir / 'rrsisd' / 'refs(unc).p'))
    for c, words in enumerate(CLASS_WORDS):
        raws = [s['raw'].lower() for r in refs if r['category_id'] == c for s in r['sentences']]
        assert sum(words in raw for raw in raws) > 0.9 * len(raws), RRSISD_CATEGORIES[c]


def test_scenes_make_the_class_name_ambiguous():
    rng = np.random.default_rng(0)
    cases = [(c, e) for c, exprs in template_expressions().items() for e in exprs[:9]]
    with_twin = 0
    for category_id, expression in cases:
        img, objects = render_scene(category_id, expression, 96, rng)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert 2 <= len(objects) <= 5 and len({o.cell for o in objects}) == len(objects)
        region, target = parse_position(expression), objects[-1]
        assert target.category_id == category_id
        assert target.cell[0] in region.rows and target.cell[1] in region.cols
        twins = [o for o in objects[:-1] if o.category_id == category_id]
        # another instance of the class never sits where the expression points
        assert all(not (o.cell[0] in region.rows and o.cell[1] in region.cols) for o in twins)
        assert all(0 <= o.polygon.min() and o.polygon.max() <= 95 for o in objects)
        with_twin += bool(twins)
    assert with_twin > 0.7 * len(cases)


@pytest.mark.parametrize('expression, rows, cols', [
    ('The storage tank on the upper left', {0}, {0}),
    ('A vehicle on the lower right', {2}, {2}),
    ('The large gray bridge in the middle', {1}, {1}),
    ('A windmill on the top', {0}, ALL),
    ('The vehicle at the bottom', {2}, ALL),
    ('A ship on the left', ALL, {0}),
    ('The tennis court on the right', ALL, {2}),
])
def test_parse_position(expression, rows, cols):
    assert parse_position(expression) == Region(frozenset(rows), frozenset(cols))


@pytest.mark.parametrize('expression', [
    'A bridge is on the upper right of the bridge on the left', 'The large harbor',
    'The vehicle is on the upper left of the tennis court on the right', 'vehicle'])
def test_parse_position_rejects_other_forms(expression):
    assert parse_position(expression) is None


def test_parse_size():
    assert parse_size('The huge stadium on the left') == 'large'
    assert parse_size('A tiny ship in the middle') == 'small'
    assert parse_size('A ship in the middle') is None


def test_same_seed_same_files(tmp_path):
    generate(tmp_path / 'a', images=12, size=48, seed=3)
    generate(tmp_path / 'b', images=12, size=48, seed=3)
    generate(tmp_path / 'c', images=12, size=48, seed=4)
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*') if p.is_file())
    assert len(files) == 14
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / 'a', tmp_path / 'b', [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(tmp_path / 'a' / 'rrsisd' / 'refs(unc).p', tmp_path / 'c' / 'rrsisd' / 'refs(unc).p',
                           shallow=False)


def test_refuses_non_empty_out_unless_overwrite(tmp_path):
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    with pytest.raises(InputError, match='not empty.*--overwrite'):
        generate(out, images=4, size=48)
    assert (out / 'keep.txt').exists()
    generate(out, images=4, size=48, overwrite=True)
    assert not (out / 'keep.txt').exists() and (out / 'rrsisd' / 'instances.json').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo']  # no temp dirs left behind


def test_template_expressions_without_shared_refs(tmp_path):
    templates = template_expressions()
    assert sorted(templates) == list(range(20))
    assert all(parse_position(e) is not None for exprs in templates.values() for e in exprs)
    refs_file = tmp_path / 'refs.p'
    refs_file.write_bytes(pickle.dumps([{'ref_id': 1, 'ann_id': 1, 'image_id': 1, 'split': 'train', 'category_id': 0,
                                         'sent_ids': [1], 'sentences': [{'raw': 'The expressway service area on the left',
                                                                             'sent_id': 1}]}]))
    with pytest.raises(InputError, match='no positional expressions for Expressway-toll-station'):
        generate(tmp_path / 'out', images=4, size=48, expressions=str(refs_file))
    assert not (tmp_path / 'out').exists()
