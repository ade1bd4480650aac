"""Generate a small demo dataset in exactly the RRSIS-D layout and formats.

    python -m refer.demo_data --out DIR [--images N] [--seed S] [--size PX] [--overwrite]

writes
    DIR/rrsisd/refs(unc).p          one ref per image, one sentence, ref_id = ann_id = image_id
    DIR/rrsisd/instances.json       polygon segmentation, bbox, area, `categories_id` (as RRSIS-D)
    DIR/images/rrsisd/JPEGImages/NNNNN.jpg

Scenes look like overhead imagery: textured ground, a few roads, and 2-5 objects of the 20 RRSIS-D
classes, each class drawn with its own shape and colours. The language is real: expressions of the
target's class are taken from the RRSIS-D refs (`../shared/rrsisd/refs(unc).p`) when they read
"<article> <adjectives> <class> on/in/at the <position>", and the target is placed where the
position says ("upper left", "right", "middle", "bottom", ...). Most images hold another instance
of the target's class elsewhere, so the class name alone (a weak expression) is ambiguous and only
the full expression singles the target out. Size words ("large", "tiny", ...) are honoured too.
Without the shared refs, template expressions of the same form are used instead.
"""
import argparse
import json
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from lib.files import atomic_output_dir
from utils import InputError, run_cli

from .demo_drawing import GRID, draw_ground, draw_object

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_RRSISD = REPO_ROOT.parent / 'shared' / 'rrsisd'

# RRSIS-D classes; the index is the category id and the name is the weak expression.
RRSISD_CATEGORIES = [
    'Expressway-Service-area', 'Expressway-toll-station', 'airplane', 'airport', 'baseballfield',
    'basketballcourt', 'bridge', 'chimney', 'dam', 'golffield', 'groundtrackfield', 'harbor',
    'overpass', 'ship', 'stadium', 'storagetank', 'tenniscourt', 'trainstation', 'vehicle', 'windmill',
]
# How RRSIS-D expressions spell each class (used only for the template fallback).
CLASS_WORDS = [
    'expressway service area', 'expressway toll station', 'airplane', 'airport', 'baseball field',
    'basketball court', 'bridge', 'chimney', 'dam', 'golf field', 'ground track field', 'harbor',
    'overpass', 'ship', 'stadium', 'storage tank', 'tennis court', 'train station', 'vehicle', 'windmill',
]
RRSISD_SPLIT_SIZES = (('train', 12181), ('val', 1740), ('test', 3481))


# ------------------------------------------------------------------------------------------------
# Reading positions and sizes from expressions


class Region(NamedTuple):
    rows: frozenset  # grid rows the target may occupy (0 = top)
    cols: frozenset  # grid cols (0 = left)

    def contains(self, x, y, size):
        """Whether pixel (x, y) of a size x size image lies in the region."""
        cell = size / GRID
        return int(min(y // cell, GRID - 1)) in self.rows and int(min(x // cell, GRID - 1)) in self.cols


_POSITION_RE = re.compile(
    r'^(?:the|a|an) (?P<noun>[a-z ]+?) (?:on|in|at) the '
    r'(?:(?P<v>upper|lower|top|bottom) )?(?P<h>left|right|middle|center|centre|top|bottom)$')
_RELATIONAL = re.compile(r'\b(?:is|of|than|to|near|next|between|above|below|with)\b')
_ROW = {'upper': 0, 'top': 0, 'lower': 2, 'bottom': 2}
_COL = {'left': 0, 'right': 2}
_ALL = frozenset(range(GRID))


def parse_position(expression):
    """Region named by an expression of the form "<article> <adjectives> <class> on/in/at the <pos>",
    or None when the expression has another form (relations to other objects, no position, ...)."""
    m = _POSITION_RE.match(' '.join(expression.lower().split()))
    if m is None or _RELATIONAL.search(m.group('noun')):
        return None
    v, h = m.group('v'), m.group('h')
    if h in _ROW:  # "at the bottom", "on the top"
        if v is not None:
            return None
        v, h = h, None
    middle = h in ('middle', 'center', 'centre')
    rows = frozenset([_ROW[v]]) if v else (frozenset([1]) if middle else _ALL)
    cols = frozenset([_COL[h]]) if h in _COL else (frozenset([1]) if middle else _ALL)
    return Region(rows, cols)


def parse_size(expression):
    words = set(expression.lower().split())
    if words & {'large', 'huge', 'big', 'larger', 'bigger'}:
        return 'large'
    if words & {'small', 'tiny', 'little', 'smaller'}:
        return 'small'
    return None


def positional_expressions(refs):
    """{category_id: [raw expressions whose position can be read]} in refs order."""
    by_class = {}
    for ref in refs:
        for sent in ref['sentences']:
            if parse_position(sent['raw']) is not None:
                by_class.setdefault(ref['category_id'], []).append(sent['raw'])
    return by_class


def group_by_region(expressions):
    """Expressions grouped by the region they name, groups in order of first appearance."""
    groups = {}
    for expression in expressions:
        groups.setdefault(parse_position(expression), []).append(expression)
    return list(groups.values())


def template_expressions():
    phrases = ['on the upper left', 'on the upper right', 'on the lower left', 'on the lower right',
               'on the left', 'on the right', 'on the top', 'at the bottom', 'in the middle']
    return {c: [f'{article} {size}{words} {phrase}' for article in ('The', 'A')
                for size in ('', 'large ', 'small ') for phrase in phrases]
            for c, words in enumerate(CLASS_WORDS)}


def load_categories(path):
    """[{'id', 'name'}] from a categories.json (a list of such dicts, as the shared file)."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"categories file '{path}' not found")
    with open(path) as f:
        cats = json.load(f)
    if not isinstance(cats, list) or not all(isinstance(c, dict) and {'id', 'name'} <= set(c) for c in cats):
        raise InputError(f"categories file '{path}' must hold a list of {{id, name}} dicts")
    return cats


# ------------------------------------------------------------------------------------------------
# Annotations for refs that have none (tests and benchmarks on the real refs)


def synthesize_instances(refs, categories, category_key='categories_id', image_size=800, seed=0):
    """An instances.json dict for refs without annotations: one image per image_id and, per ref,
    a random quadrilateral polygon under `category_key` (RRSIS-D: 'categories_id')."""
    rng = np.random.default_rng(seed)
    images, annotations = {}, []
    corners = rng.uniform(0.05, 0.45, size=(len(refs), 4)) * image_size  # left, top, width, height
    for ref, (x, y, w, h) in zip(refs, corners.tolist()):
        images.setdefault(ref['image_id'], {'id': ref['image_id'], 'file_name': ref['file_name'],
                                            'height': image_size, 'width': image_size})
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        annotations.append({'id': ref['ann_id'], 'image_id': ref['image_id'],
                            category_key: ref['category_id'], 'segmentation': [_round(polygon)],
                            'bbox': _round([x, y, w, h]), 'area': round(w * h, 2), 'iscrowd': 0})
    return {'images': list(images.values()), 'annotations': annotations,
            'categories': [{'id': c['id'], 'name': c['name']} for c in categories]}


def _round(values):
    return [round(float(v), 2) for v in values]


# ------------------------------------------------------------------------------------------------
# Scenes: the target where its expression says, other instances of its class elsewhere


class SceneObject(NamedTuple):
    category_id: int
    cell: tuple  # (row, col) on the 3 x 3 grid
    polygon: np.ndarray  # [K, 2] outline in pixels


def render_scene(category_id, expression, size, rng):
    """(image [S, S, 3] uint8 RGB, objects); objects[-1] is the target, placed where the expression
    says; other instances of its class (usually one or two) sit outside that region."""
    region = parse_position(expression)
    if region is None:
        raise ValueError(f'expression without a readable position: {expression!r}')
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    inside = [cell for cell in cells if cell[0] in region.rows and cell[1] in region.cols]
    outside = [cell for cell in cells if cell not in inside]
    target_cell = inside[rng.integers(len(inside))]

    size_word = parse_size(expression)
    target_scale = {'large': 1.0, 'small': 0.55}.get(size_word, rng.uniform(0.75, 1.0))
    twin_scale = {'large': 0.55, 'small': 1.0}.get(size_word)

    n_objects = int(rng.integers(2, 6))
    n_twins = 0 if rng.random() < 0.15 else int(rng.integers(1, 3))  # more of the target's class
    n_twins = min(n_twins, n_objects - 1, len(outside))
    twin_cells = [outside[i] for i in rng.permutation(len(outside))[:n_twins]]
    free = [cell for cell in cells if cell != target_cell and cell not in twin_cells]
    other_cells = [free[i] for i in rng.permutation(len(free))[:n_objects - 1 - n_twins]]
    others = [c for c in range(len(RRSISD_CATEGORIES)) if c != category_id]

    img = draw_ground(size, rng)
    objects = []
    for cell in other_cells:
        other = others[rng.integers(len(others))]
        objects.append(SceneObject(other, cell, draw_object(img, other, cell, size, rng.uniform(0.7, 1.0), rng)))
    for cell in twin_cells:
        scale = twin_scale or rng.uniform(0.75, 1.0)
        objects.append(SceneObject(category_id, cell, draw_object(img, category_id, cell, size, scale, rng)))
    objects.append(SceneObject(category_id, target_cell,
                               draw_object(img, category_id, target_cell, size, target_scale, rng)))
    return img, objects


# ------------------------------------------------------------------------------------------------
# Writing


def split_names(n):
    """Split of each of n refs in RRSIS-D's proportions (train / val / test)."""
    total = sum(count for _, count in RRSISD_SPLIT_SIZES)
    n_train = round(n * RRSISD_SPLIT_SIZES[0][1] / total)
    n_val = round(n * RRSISD_SPLIT_SIZES[1][1] / total)
    return ['train'] * n_train + ['val'] * n_val + ['test'] * (n - n_train - n_val)


def load_expressions(path=None):
    """{category_id: [positional expressions]} from a refs file; the shared RRSIS-D refs by default,
    templates when no path is given and the shared file is absent."""
    from refer.refer import load_refs

    if path is None:
        path = SHARED_RRSISD / 'refs(unc).p'
        if not path.is_file():
            print(f'demo_data: {path} not found; using template expressions', file=sys.stderr)
            return template_expressions()
    by_class = positional_expressions(load_refs(str(path)))
    missing = [RRSISD_CATEGORIES[c] for c in range(len(RRSISD_CATEGORIES)) if not by_class.get(c)]
    if missing:
        raise InputError(f"refs file '{path}' has no positional expressions for {', '.join(missing)}")
    return by_class


def generate(out, images=300, seed=0, size=128, overwrite=False, expressions=None):
    """Write the demo dataset to `out` (see module doc); returns a summary dict."""
    if images < 1:
        raise InputError(f'--images must be at least 1, got {images}')
    if size < 3 * GRID * 4:
        raise InputError(f'--size must be at least {3 * GRID * 4} px, got {size}')
    with atomic_output_dir(out, overwrite) as tmp:  # refuses a non-empty `out` before any work
        by_class_region = {c: group_by_region(exprs) for c, exprs in load_expressions(expressions).items()}
        rng = np.random.default_rng(seed)
        n_classes = len(RRSISD_CATEGORIES)
        classes = rng.permutation(np.arange(images) % n_classes)  # every class, balanced
        splits = [split_names(images)[i] for i in rng.permutation(images)]

        image_dir = tmp / 'images' / 'rrsisd' / 'JPEGImages'
        image_dir.mkdir(parents=True)
        refs, anns, imgs = [], [], []
        for i, (category_id, split) in enumerate(zip(classes.tolist(), splits)):
            idx = i + 1  # ref_id = ann_id = image_id = sent_id, as in RRSIS-D
            # pick a position first, then an expression: real expressions say "in the middle"
            # far more often than anything else, and the demo should exercise every position
            by_region = by_class_region[category_id]
            candidates = by_region[rng.integers(len(by_region))]
            expression = candidates[rng.integers(len(candidates))]
            img, objects = render_scene(category_id, expression, size, rng)
            polygon = objects[-1].polygon  # the target
            file_name = f'{idx:05d}.jpg'
            cv2.imwrite(str(image_dir / file_name), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])

            flat = _round(polygon.reshape(-1))
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], size, size))
            imgs.append({'id': idx, 'file_name': file_name, 'height': size, 'width': size})
            anns.append({'id': idx, 'image_id': idx, 'categories_id': category_id, 'segmentation': [flat],
                         'bbox': [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                         'area': int(mask_utils.area(rle)), 'iscrowd': 0})
            refs.append({'image_id': idx, 'split': split, 'file_name': file_name, 'category_id': category_id,
                         'ann_id': idx, 'ref_id': idx, 'sent_ids': [idx],
                         'sentences': [{'tokens': expression.split(), 'raw': expression, 'sent_id': idx,
                                        'sent': expression}]})

        data_dir = tmp / 'rrsisd'
        data_dir.mkdir()
        with open(data_dir / 'refs(unc).p', 'wb') as f:
            pickle.dump(refs, f, protocol=4)
        categories = [{'id': c, 'name': name} for c, name in enumerate(RRSISD_CATEGORIES)]
        with open(data_dir / 'instances.json', 'w') as f:
            json.dump({'images': imgs, 'annotations': anns, 'categories': categories}, f)
    return {'images': images, 'size': size, 'splits': {s: splits.count(s) for s in ('train', 'val', 'test')}}


def get_args_parser():
    parser = argparse.ArgumentParser(prog='python -m refer.demo_data',
                                     description='Generate a small demo dataset in the RRSIS-D layout.')
    parser.add_argument('--out', required=True, help='output data root (use it as --refer_data_root)')
    parser.add_argument('--images', type=int, default=300, help='number of images (= refs)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--expressions', default=None,
                        help='refs file to take expressions from (default: ../shared/rrsisd/refs(unc).p)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    tic = time.time()
    summary = generate(args.out, images=args.images, seed=args.seed, size=args.size,
                       overwrite=args.overwrite, expressions=args.expressions)
    splits = ', '.join(f'{k} {v}' for k, v in summary['splits'].items())
    print(f"demo_data: wrote {summary['images']} images ({summary['size']} px; {splits}) "
          f'to {args.out} in {time.time() - tic:.1f}s')


if __name__ == '__main__':
    run_cli(main)
