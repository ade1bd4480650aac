"""REFER API: the real RRSIS-D refs with synthesized annotations, masks from polygons and RLE, and
one-line errors for bad input."""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer.demo_data import load_categories, synthesize_instances
from refer.refer import REFER, load_instances, load_refs
from utils import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_root(root, refs, instances, dataset='rrsisd'):
    data_dir = Path(root) / dataset
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f)
    with open(data_dir / 'instances.json', 'w') as f:
        json.dump(instances, f)
    return Path(root)


def make_ref(i, category_id=0, split='train', raw='the thing on the left'):
    return {'ref_id': i, 'ann_id': i, 'image_id': i, 'file_name': f'{i:05d}.jpg', 'split': split,
            'category_id': category_id, 'sent_ids': [i],
            'sentences': [{'raw': raw, 'sent': raw, 'tokens': raw.split(), 'sent_id': i}]}


def tiny_instances(segmentations, size=(20, 30), category_key='categories_id'):
    h, w = size
    n = len(segmentations)
    return {'images': [{'id': i, 'file_name': f'{i:05d}.jpg', 'height': h, 'width': w} for i in range(1, n + 1)],
            'annotations': [{'id': i, 'image_id': i, category_key: 0, 'segmentation': seg, 'bbox': [0, 0, 1, 1],
                             'area': 1} for i, seg in enumerate(segmentations, 1)],
            'categories': [{'id': 0, 'name': 'vehicle'}]}


# --- the real refs -----------------------------------------------------------------------------


def test_load_refs_real_file_is_plain_data(shared_dir):
    refs = load_refs(str(shared_dir / 'rrsisd' / 'refs(unc).p'))
    assert len(refs) == 17402
    assert Counter(r['split'] for r in refs) == {'train': 12181, 'val': 1740, 'test': 3481}
    assert all(r['ref_id'] == r['ann_id'] == r['image_id'] for r in refs)


def test_refer_on_real_refs_with_categories_id(rrsisd_refs_root):
    refer = REFER(str(rrsisd_refs_root), 'rrsisd', 'unc')
    assert len(refer.Refs) == len(refer.Anns) == len(refer.Imgs) == len(refer.Sents) == 17402
    assert [len(refer.getRefIds(split=s)) for s in ('train', 'val', 'test')] == [12181, 1740, 3481]
    assert len(refer.getRefIds()) == 17402
    assert sorted(refer.getCatIds()) == list(range(20))
    assert refer.loadCats(15) == ['storagetank']
    assert refer.IMAGE_DIR == os.path.join(str(rrsisd_refs_root), 'images/rrsisd/JPEGImages')

    ref = refer.loadRefs(refer.getRefIds(split='val')[0])[0]
    assert refer.getAnnIds(ref_ids=ref['ref_id']) == [ref['ann_id']]
    assert refer.getImgIds(ref['ref_id']) == [ref['image_id']]
    assert refer.loadImgs(ref['image_id'])[0]['file_name'] == ref['file_name']
    assert refer.getRefIds(image_ids=ref['image_id']) == [ref['ref_id']]
    n_cat = sum(1 for r in refer.Refs.values() if r['category_id'] == 2)
    assert len(refer.getRefIds(cat_ids=2)) == len(refer.getAnnIds(cat_ids=[2])) == n_cat

    m = refer.getMask(ref)
    assert m['mask'].dtype == np.uint8 and m['mask'].shape == (800, 800)
    assert set(np.unique(m['mask'])) == {0, 1}
    ann = refer.loadAnns(ref['ann_id'])[0]
    assert abs(m['area'] - ann['area']) / ann['area'] < 0.05
    x, y, w, h = refer.getRefBox(ref['ref_id'])
    ys, xs = np.nonzero(m['mask'])
    assert abs(xs.min() - x) <= 1 and abs(ys.max() - (y + h)) <= 1


def test_refer_on_real_refs_with_category_id(shared_dir, tmp_path):
    refs_file = shared_dir / 'rrsisd' / 'refs(unc).p'
    refs = load_refs(str(refs_file))
    instances = synthesize_instances(refs[:500], load_categories(shared_dir / 'rrsisd' / 'categories.json'),
                                     category_key='category_id')
    root = write_root(tmp_path, refs[:500], instances)
    refer = REFER(str(root), 'rrsisd', 'unc')
    assert len(refer.Refs) == 500
    n_cat = sum(1 for r in refs[:500] if r['category_id'] == 18)
    assert len(refer.getAnnIds(cat_ids=18)) == n_cat > 0
    assert refer.getMask(refs[0])['mask'].sum() > 0


def test_category_names_are_the_shared_ones(shared_dir):
    from refer.demo_data import RRSISD_CATEGORIES
    cats = load_categories(shared_dir / 'rrsisd' / 'categories.json')
    assert [c['name'] for c in sorted(cats, key=lambda c: c['id'])] == RRSISD_CATEGORIES


# --- masks -------------------------------------------------------------------------------------


def test_masks_from_polygon_and_rle_agree(tmp_path):
    h, w = 20, 30
    expected = np.zeros((h, w), dtype=np.uint8)
    expected[4:12, 5:17] = 1
    rle = mask_utils.encode(np.asfortranarray(expected))
    compressed = {'size': [h, w], 'counts': rle['counts'].decode('ascii')}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = expected.flatten(order='F')
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))).tolist()
    uncompressed = {'size': [h, w], 'counts': np.diff([0] + changes).tolist()}
    polygon = [[4.5, 3.5, 16.5, 3.5, 16.5, 11.5, 4.5, 11.5]]
    two_polygons = [[4.5, 3.5, 10.5, 3.5, 10.5, 11.5, 4.5, 11.5], [9.5, 3.5, 16.5, 3.5, 16.5, 11.5, 9.5, 11.5]]
    segs = [polygon, compressed, uncompressed, two_polygons]
    refs = [make_ref(i) for i in range(1, len(segs) + 1)]
    refer = REFER(str(write_root(tmp_path, refs, tiny_instances(segs))), 'rrsisd')
    for ref in refs:
        m = refer.getMask(ref)
        np.testing.assert_array_equal(m['mask'], expected, err_msg=f'ref {ref["ref_id"]}')
        assert m['area'] == expected.sum()


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture
def good_root(tmp_path):
    refs = [make_ref(i) for i in (1, 2, 3)]
    return write_root(tmp_path / 'root', refs, tiny_instances([[[1, 1, 8, 1, 8, 8]]] * 3))


def test_missing_data_root(tmp_path):
    with pytest.raises(InputError, match='nowhere'):
        REFER(str(tmp_path / 'nowhere'), 'rrsisd')


def test_unknown_dataset(good_root):
    with pytest.raises(InputError, match='refcocoX'):
        REFER(str(good_root), 'refcocoX')


def test_missing_refs_and_instances_files(good_root):
    os.remove(good_root / 'rrsisd' / 'instances.json')
    with pytest.raises(InputError, match=r'instances\.json'):
        REFER(str(good_root), 'rrsisd')
    with pytest.raises(InputError, match=r'refs\(google\)\.p'):
        REFER(str(good_root), 'rrsisd', 'google')


@pytest.mark.parametrize('drop, message', [('annotations', r'ref 2: annotation 2'), ('images', r'ref 2: image 2')])
def test_ref_without_annotation_or_image(good_root, drop, message):
    path = good_root / 'rrsisd' / 'instances.json'
    instances = load_instances(str(path))
    instances[drop] = [x for x in instances[drop] if x['id'] != 2]
    path.write_text(json.dumps(instances))
    with pytest.raises(InputError, match=message):
        REFER(str(good_root), 'rrsisd')


@pytest.mark.parametrize('payload', [{'refs': []}, [make_ref(1), 7], 'text', [{'ref_id': 1}]])
def test_refs_file_not_a_list_of_ref_dicts(tmp_path, payload):
    path = tmp_path / 'refs(unc).p'
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(InputError, match=str(path).replace('(', r'\(').replace(')', r'\)')):
        load_refs(str(path))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


@pytest.mark.parametrize('make_payload', [
    lambda target: [make_ref(1), _Exploit(target)],          # code execution through a global
    lambda target: [OrderedDict(make_ref(1))],               # even a harmless-looking class
    lambda target: [make_ref(1), np.int64(3)],               # numpy scalars are not plain data either
])
def test_pickle_with_globals_is_refused(tmp_path, make_payload):
    target = tmp_path / 'pwned'
    path = tmp_path / 'refs(unc).p'
    path.write_bytes(pickle.dumps(make_payload(str(target))))
    with pytest.raises(InputError, match='only plain data'):
        load_refs(str(path))
    assert not target.exists()


def test_not_a_pickle(tmp_path):
    path = tmp_path / 'refs(unc).p'
    path.write_bytes(b'definitely not a pickle')
    with pytest.raises(InputError, match='not a readable pickle'):
        load_refs(str(path))


def test_cli_reports_bad_pickle_in_one_line(tmp_path):
    refs_file = tmp_path / 'refs(unc).p'
    refs_file.write_bytes(pickle.dumps([_Exploit(str(tmp_path / 'pwned'))]))
    proc = subprocess.run([sys.executable, '-m', 'refer.demo_data', '--out', str(tmp_path / 'demo'),
                           '--images', '4', '--expressions', str(refs_file)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'error:' in lines[0] and str(refs_file) in lines[0], proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'demo').exists()
