"""REFER API over the RRSIS-D / RIS-LAD layout.

    <root>/<dataset>/refs(<splitBy>).p        pickled list of ref dicts (plain data only)
    <root>/<dataset>/instances.json           COCO-style images / annotations / categories
    <root>/images/<dataset>/JPEGImages/<file_name>

Same public names as the classic REFER class (getRefIds, getAnnIds, getImgIds, getCatIds,
loadRefs, loadAnns, loadImgs, loadCats, getRefBox, getMask; dicts Refs Anns Imgs Cats Sents ...),
with three differences that matter to users:
  * refs pickles come from outside, so they are read with a restricted unpickler that admits no
    global at all (`load_refs`); the real RRSIS-D file needs none,
  * every index is built in one linear pass,
  * bad data (missing files, a ref whose annotation or image is absent, a refs file that is not a
    list of dicts, a malformed field) raises `utils.InputError` with one line naming the path, the id
    and the field at fault (the field checks are in `refer.check`).
"""
import io
import json
import os
import pickle
import time
from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils

from utils import InputError

from .check import REQUIRED_REF_KEYS, category_id_of, check_instances, check_ref_links, check_refs  # noqa: F401
from .check import segmentation_problem

# Datasets with a known image folder (relative to the data root). RRSIS-D and RIS-LAD are the
# ones this project targets; the RefCOCO family is kept so the classic API keeps working.
IMAGE_DIRS = {
    'rrsisd': 'images/rrsisd/JPEGImages',
    'res_lad': 'images/res_lad/JPEGImages',
    'refcoco': 'images/mscoco/images/train2014',
    'refcoco+': 'images/mscoco/images/train2014',
    'refcocog': 'images/mscoco/images/train2014',
    'refclef': 'images/saiapr_tc-12',
}

# ------------------------------------------------------------------------------------------------
# Loading


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle asks for something other than plain data."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global, so only dicts, lists, tuples, sets, str, bytes, numbers,
    bools and None can come out. Refs files are plain data; anything else is an attack or a bug."""

    def find_class(self, module, name):
        raise ForbiddenPickleError(f'refuses to load global {module}.{name}; only plain data is allowed')

    def persistent_load(self, pid):
        raise ForbiddenPickleError('refuses persistent ids; only plain data is allowed')


def _check_file(path, what):
    if not os.path.isfile(path):
        raise InputError(f"{what} '{path}' not found")


def load_refs(path):
    """List of ref dicts from a refs pickle, loaded without executing anything from the file."""
    _check_file(path, 'refs file')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        refs = _PlainDataUnpickler(io.BytesIO(data)).load()
    except ForbiddenPickleError as e:
        raise InputError(f"refs file '{path}': {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise InputError(f"refs file '{path}' is not a readable pickle ({type(e).__name__}: {e})") from None
    return check_refs(refs, path)  # every field the scripts read, one line naming ref and field


def load_instances(path):
    """The instances.json dict, checked to hold lists `images`, `annotations` and `categories`."""
    _check_file(path, 'instances file')
    try:
        with open(path, 'r') as f:
            instances = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"instances file '{path}' is not valid JSON ({e})") from None
    return check_instances(instances, path)  # lists of records with ids, file names, names


# ------------------------------------------------------------------------------------------------
# The API


def _as_list(ids):
    """Ids as a list: the classic API takes one id or a list of them (numpy/torch values too)."""
    if ids is None:
        return []
    if hasattr(ids, 'tolist'):
        ids = ids.tolist()
    if isinstance(ids, (list, tuple, set, frozenset, range, type({}.keys()))):
        return list(ids)
    return [ids]


class REFER:
    def __init__(self, data_root, dataset='rrsisd', splitBy='unc', verbose=False):
        if dataset not in IMAGE_DIRS:
            raise InputError(f"unknown dataset '{dataset}' (--dataset); known: {', '.join(IMAGE_DIRS)}")
        if not os.path.isdir(data_root):
            raise InputError(f"data root '{data_root}' is not a directory (--refer_data_root)")
        tic = time.time()
        self.dataset = dataset
        self.splitBy = splitBy
        self.DATA_DIR = os.path.join(data_root, dataset)
        self.IMAGE_DIR = os.path.join(data_root, IMAGE_DIRS[dataset])
        self.refs_file = os.path.join(self.DATA_DIR, f'refs({splitBy}).p')
        self.instances_file = os.path.join(self.DATA_DIR, 'instances.json')
        refs = load_refs(self.refs_file)
        instances = load_instances(self.instances_file)
        self.data = {
            'dataset': dataset,
            'refs': refs,
            'images': instances['images'],
            'annotations': instances['annotations'],
            'categories': instances['categories'],
        }
        self.createIndex()
        if verbose:
            print(f'REFER {dataset}({splitBy}): {len(self.Refs)} refs, {len(self.Anns)} anns, '
                  f'{len(self.Imgs)} images ({time.time() - tic:.2f}s)')

    def createIndex(self):
        """All lookup dicts in one pass over annotations, images, categories and refs."""
        Anns, Imgs, Cats = {}, {}, {}
        imgToAnns = defaultdict(list)
        for ann in self.data['annotations']:
            Anns[ann['id']] = ann
            imgToAnns[ann['image_id']].append(ann)
        for img in self.data['images']:
            Imgs[img['id']] = img
        for cat in self.data['categories']:
            Cats[cat['id']] = cat['name']

        check_ref_links(self.data['refs'], Anns, self.refs_file, self.instances_file, Imgs, Cats)
        Refs, refToAnn, annToRef = {}, {}, {}
        imgToRefs, catToRefs = defaultdict(list), defaultdict(list)
        Sents, sentToRef, sentToTokens = {}, {}, {}
        for ref in self.data['refs']:
            ref_id, ann_id, image_id = ref['ref_id'], ref['ann_id'], ref['image_id']
            category_id = category_id_of(ref)
            Refs[ref_id] = ref
            refToAnn[ref_id] = Anns[ann_id]
            annToRef[ann_id] = ref
            imgToRefs[image_id].append(ref)
            catToRefs[category_id].append(ref)
            for sent in ref['sentences']:
                Sents[sent['sent_id']] = sent
                sentToRef[sent['sent_id']] = ref
                sentToTokens[sent['sent_id']] = sent.get('tokens', sent['raw'].split())

        self.Refs, self.Anns, self.Imgs, self.Cats, self.Sents = Refs, Anns, Imgs, Cats, Sents
        self.imgToRefs, self.imgToAnns = dict(imgToRefs), dict(imgToAnns)
        self.refToAnn, self.annToRef, self.catToRefs = refToAnn, annToRef, dict(catToRefs)
        self.sentToRef, self.sentToTokens = sentToRef, sentToTokens

    # --- queries ---------------------------------------------------------------------------------

    def getRefIds(self, image_ids=(), cat_ids=(), ref_ids=(), split=''):
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = self.data['refs']
        if cat_ids:
            cat_ids = set(cat_ids)
            refs = [ref for ref in refs if category_id_of(ref) in cat_ids]
        if ref_ids:
            ref_ids = set(ref_ids)
            refs = [ref for ref in refs if ref['ref_id'] in ref_ids]
        if split:
            refs = [ref for ref in refs if _split_matches(ref['split'], split)]
        return [ref['ref_id'] for ref in refs]

    def getAnnIds(self, image_ids=(), cat_ids=(), ref_ids=()):
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            anns = [ann for image_id in image_ids for ann in self.imgToAnns.get(image_id, [])]
        else:
            anns = self.data['annotations']
        if cat_ids:
            cat_ids = set(cat_ids)
            anns = [ann for ann in anns if category_id_of(ann) in cat_ids]
        if ref_ids:
            wanted = {self.Refs[ref_id]['ann_id'] for ref_id in ref_ids}
            anns = [ann for ann in anns if ann['id'] in wanted]
        return [ann['id'] for ann in anns]

    def getImgIds(self, ref_ids=()):
        ref_ids = _as_list(ref_ids)
        if ref_ids:
            # order of first appearance, without duplicates
            return list(dict.fromkeys(self.Refs[ref_id]['image_id'] for ref_id in ref_ids))
        return list(self.Imgs)

    def getCatIds(self):
        return list(self.Cats)

    def loadRefs(self, ref_ids=()):
        return [self.Refs[i] for i in _as_list(ref_ids)]

    def loadAnns(self, ann_ids=()):
        return [self.Anns[i] for i in _as_list(ann_ids)]

    def loadImgs(self, image_ids=()):
        return [self.Imgs[i] for i in _as_list(image_ids)]

    def loadCats(self, cat_ids=()):
        return [self.Cats[i] for i in _as_list(cat_ids)]

    def getRefBox(self, ref_id):
        return self.refToAnn[ref_id]['bbox']  # [x, y, w, h]

    def category_name(self, ref):
        return self.Cats[category_id_of(ref)]

    def image_path(self, ref):
        return os.path.join(self.IMAGE_DIR, self.Imgs[ref['image_id']]['file_name'])

    def getMask(self, ref):
        """{'mask': uint8 [H, W] in {0, 1}, 'area': int} of the ref's annotation."""
        ann = self.refToAnn[ref['ref_id']]
        image = self.Imgs[ref['image_id']]
        rle = segmentation_to_rle(ann.get('segmentation'), image.get('height'), image.get('width'),
                                  where=f"instances file '{self.instances_file}': annotation {ann['id']} "
                                        f"(ref {ref['ref_id']})")
        m = mask_utils.decode(rle).astype(np.uint8)  # [H, W]
        return {'mask': m, 'area': int(mask_utils.area(rle))}


def _split_matches(ref_split, split):
    if split == 'test':  # as the classic API: testA / testB count as test
        return 'test' in ref_split
    if split in ('testA', 'testB', 'testC'):
        return split[-1] in ref_split and 'test' in ref_split
    return ref_split == split


def segmentation_to_rle(segmentation, height, width, where='annotation'):
    """One compressed RLE from polygons (list of flat xy lists), uncompressed RLE (counts list) or
    compressed RLE (counts str/bytes). Several polygons are merged into one mask. What does not decode
    to a height x width mask (see `check.segmentation_problem`) is an InputError naming `where`."""
    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise InputError(f'{where}: {problem}')
    if isinstance(segmentation, dict):
        size, counts = list(segmentation['size']), segmentation['counts']
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects({'size': size, 'counts': counts}, *size)
        if isinstance(counts, str):
            counts = counts.encode('ascii')
        return {'size': size, 'counts': counts}
    return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in segmentation], height, width))
