"""Data checks that run before the first training step, each failing with one `InputError` line that
names the file, the ref / annotation / image id and the field.

Cheap field checks (always, on load):
  check_refs(refs, path)                      refer.load_refs: ids, split, sentences (dicts, str 'raw')
  check_instances(instances, path)            refer.load_instances: images, annotations, categories
  check_ref_links(refs, anns, ...)            REFER.createIndex, mask_train_only.py: every ref's
                                              annotation / image / category exists, the annotation
                                              lies on the ref's image
One pass over a split's data (seconds on RRSIS-D; parallel on a process pool, tqdm on a terminal):
  check_split_data(refer, refs, workers=N)    ReferDataset (so train.py, test.py and every script
                                              built on build_dataset): every mask decodes to its
                                              image's size, every image header reads, at the size
                                              instances.json gives, in a mode refer.images decodes;
                                              no train ref has an empty mask or a blank expression
  check_masks(refs, anns, images, ...)        mask_train_only.py (masks only; it needs no images)
Pure helpers: segmentation_problem, mask_problem (segmentation, height, width); images.image_problem.
"""
import logging
import math
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from utils import InputError

from .images import image_problem

logger = logging.getLogger('lrb')

REQUIRED_REF_KEYS = ('ref_id', 'ann_id', 'image_id', 'split', 'sentences')
PARALLEL_MIN_ITEMS = 2000  # below this a process pool costs more than it saves
CHUNK = 256


def category_id_of(record):
    """Class id of a ref or annotation: RRSIS-D annotations say `categories_id`, COCO `category_id`."""
    if 'category_id' in record:
        return record['category_id']
    return record.get('categories_id')


def _kind(value):
    if value is None:
        return 'None'
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_id(value):
    return type(value) is int or (isinstance(value, str) and value != '')


# ------------------------------------------------------------------------------------------------
# fields


def check_refs(refs, path):
    """Every ref a dict with ids, a str split and a list of sentence dicts holding a str 'raw'."""
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        got = (f'a list holding {_kind(next(r for r in refs if not isinstance(r, dict)))}'
               if isinstance(refs, list) else _kind(refs))
        raise InputError(f"refs file '{path}' must hold a list of dicts, got {got}")
    seen = set()
    for i, ref in enumerate(refs):
        missing = [k for k in REQUIRED_REF_KEYS if k not in ref]
        if category_id_of(ref) is None:
            missing.append('category_id')
        if missing:
            raise InputError(f"refs file '{path}': ref #{i} (ref_id {ref.get('ref_id')}) lacks {', '.join(missing)}")
        ref_id = ref['ref_id']
        where = f"refs file '{path}': ref #{i} (ref_id {ref_id!r})"
        for key in ('ref_id', 'ann_id', 'image_id'):
            if not _is_id(ref[key]):
                raise InputError(f"{where}: '{key}' is {_kind(ref[key])}, not an id")
        if not _is_id(category_id_of(ref)):
            raise InputError(f"{where}: 'category_id' is {_kind(category_id_of(ref))}, not an id")
        if ref_id in seen:
            raise InputError(f"refs file '{path}': ref_id {ref_id} appears twice")
        seen.add(ref_id)
        where = f"refs file '{path}': ref {ref_id}"
        if not isinstance(ref['split'], str):
            raise InputError(f"{where}: 'split' is {_kind(ref['split'])}, not a string")
        sentences = ref['sentences']
        if not isinstance(sentences, list):
            raise InputError(f"{where}: 'sentences' is {_kind(sentences)}, not a list")
        for j, sent in enumerate(sentences):
            if not isinstance(sent, dict):
                raise InputError(f"{where}: sentences[{j}] is {_kind(sent)}, not a dict")
            if 'raw' not in sent:
                raise InputError(f"{where}: sentences[{j}] has no 'raw'")
            if not isinstance(sent['raw'], str):
                raise InputError(f"{where}: sentences[{j}]['raw'] is {_kind(sent['raw'])}, not a string")
            if 'sent_id' not in sent:
                raise InputError(f"{where}: sentences[{j}] has no 'sent_id'")
            if 'tokens' in sent and not isinstance(sent['tokens'], list):
                raise InputError(f"{where}: sentences[{j}]['tokens'] is {_kind(sent['tokens'])}, not a list")
    return refs


def _check_records(records, path, what, fields):
    """Dicts with a unique id and `fields` {name: (test, description)}; -> {id: record}."""
    by_id = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"instances file '{path}': {what}s[{i}] is {_kind(rec)}, not a dict")
        if 'id' not in rec:
            raise InputError(f"instances file '{path}': {what}s[{i}] has no 'id'")
        rec_id = rec['id']
        if not _is_id(rec_id):
            raise InputError(f"instances file '{path}': {what}s[{i}]: 'id' is {_kind(rec_id)}, not an id")
        if rec_id in by_id:
            raise InputError(f"instances file '{path}': {what} id {rec_id} appears twice")
        for name, (ok, description, required) in fields.items():
            if name not in rec or rec[name] is None:
                if required:
                    raise InputError(f"instances file '{path}': {what} {rec_id} has no '{name}'")
            elif not ok(rec[name]):
                raise InputError(f"instances file '{path}': {what} {rec_id}: '{name}' is "
                                 f"{_kind(rec[name])} {rec[name]!r:.40}, not {description}")
        by_id[rec_id] = rec
    return by_id


_POSITIVE_INT = (lambda v: type(v) is int and v > 0, 'a positive integer', False)
_IMAGE_FIELDS = {'file_name': (lambda v: isinstance(v, str) and v != '', 'a file name', True),
                 'height': _POSITIVE_INT, 'width': _POSITIVE_INT}
_ANN_FIELDS = {'image_id': (_is_id, 'an id', True)}
_CAT_FIELDS = {'name': (lambda v: isinstance(v, str) and v != '', 'a name', True)}


def check_instances(instances, path):
    """images (id, file_name, height/width positive ints when given), annotations (id, image_id) and
    categories (id, name), each id unique."""
    if not isinstance(instances, dict):
        raise InputError(f"instances file '{path}' must hold a JSON object, got {type(instances).__name__}")
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(instances.get(key), list):
            raise InputError(f"instances file '{path}' lacks a list '{key}'")
    _check_records(instances['images'], path, 'image', _IMAGE_FIELDS)
    _check_records(instances['annotations'], path, 'annotation', _ANN_FIELDS)
    _check_records(instances['categories'], path, 'category', _CAT_FIELDS)
    return instances


def check_ref_links(refs, anns, refs_file, instances_file, images=None, categories=None):
    """Each ref's annotation exists and lies on the ref's image; its image and category exist
    (`images` / `categories`: collections of ids, None to skip)."""
    for ref in refs:
        ref_id, ann_id, image_id = ref['ref_id'], ref['ann_id'], ref['image_id']
        ann = anns.get(ann_id)
        if ann is None:
            raise InputError(f"ref {ref_id}: annotation {ann_id} not found in '{instances_file}'")
        if images is not None and image_id not in images:
            raise InputError(f"ref {ref_id}: image {image_id} not found in '{instances_file}'")
        if categories is not None and category_id_of(ref) not in categories:
            raise InputError(f"ref {ref_id}: category {category_id_of(ref)} not found in '{instances_file}'")
        if ann.get('image_id') != image_id:
            raise InputError(f"ref {ref_id}: annotation {ann_id} lies on image {ann.get('image_id')} "
                             f"('image_id' in '{instances_file}'), but the ref says image {image_id} "
                             f"('image_id' in '{refs_file}')")


# ------------------------------------------------------------------------------------------------
# masks


def compressed_rle_total(counts):
    """Pixels covered by a COCO compressed RLE string (what pycocotools' rleFrString reads); None if invalid."""
    return None if (runs := compressed_rle_runs(counts)) is None else int(runs.sum())


def compressed_rle_runs(counts):
    """The run lengths (int64, background first) of a COCO compressed RLE string, or None when it is not a
    valid one: a character out of range, a truncated value, a negative run."""
    if isinstance(counts, str):
        try:
            counts = counts.encode('ascii')
        except UnicodeEncodeError:
            return None
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        return None
    ends = np.flatnonzero((c & 0x20) == 0)                 # last character of each value
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:                                  # > 2^35: no image is that large
        return None
    pos = np.arange(c.size) - np.repeat(starts, lengths)   # character index within its value
    values = np.add.reduceat((c & 0x1f) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * lengths[negative])
    runs = values.copy()                                   # runs 3, 4, ... are deltas to run i - 2
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0 or runs.max() >= 2 ** 32:
        return None
    return runs


def _polygon_problem(segmentation):
    if not segmentation:
        return "'segmentation' is an empty list of polygons"
    for k, poly in enumerate(segmentation):
        if not isinstance(poly, (list, tuple)):
            return f"'segmentation' polygon {k} is {_kind(poly)}, not a list of numbers"
        for v in poly:
            if type(v) is float:
                if not math.isfinite(v):
                    return f"'segmentation' polygon {k} holds {v}"
            elif type(v) is not int:
                return f"'segmentation' polygon {k} holds {_kind(v)} ({v!r:.20}), not numbers"
        if len(poly) % 2:
            return f"'segmentation' polygon {k} has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"'segmentation' polygon {k} has {len(poly) // 2} point(s); a polygon needs at least 3"
    return None


def _rle_problem(rle, height, width):
    """(what keeps the RLE from decoding, or None; its foreground pixels, or None when it does not decode)."""
    size, counts = rle.get('size'), rle.get('counts')
    if size is None or counts is None:
        return f"'segmentation' RLE has no '{'size' if size is None else 'counts'}'", None
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(type(s) is int and s > 0 for s in size)):
        return f"'segmentation' RLE size {size!r:.40} is not [height, width]", None
    h, w = size
    if height is not None and width is not None and (h, w) != (height, width):
        return f"'segmentation' RLE size [{h}, {w}] differs from its image's [height, width] [{height}, {width}]", None
    if isinstance(counts, list):
        if not all(type(n) is int and n >= 0 for n in counts):
            return "'segmentation' RLE counts must be non-negative integers", None
        total, foreground = sum(counts), sum(counts[1::2])
    elif isinstance(counts, (str, bytes)):
        runs = compressed_rle_runs(counts)
        if runs is None:
            return "'segmentation' RLE counts is not a valid compressed RLE string", None
        total, foreground = int(runs.sum()), int(runs[1::2].sum())
    else:
        return f"'segmentation' RLE counts is {_kind(counts)}, not a list or a string", None
    if total != h * w:
        return f"'segmentation' RLE counts cover {total} pixels, not height x width = {h * w}", None
    return None, foreground


def segmentation_problem(segmentation, height, width):
    """What keeps `segmentation` (polygons, uncompressed or compressed RLE) from decoding to a
    height x width mask, as text starting with the field; None when it decodes."""
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)[0]
    if isinstance(segmentation, list):
        if height is None or width is None:
            return "'segmentation' is polygons, but the image has no 'height' and 'width' to draw them at"
        return _polygon_problem(segmentation)
    if segmentation is None:
        return "'segmentation' is missing"
    return f"'segmentation' is {_kind(segmentation)}, not polygons or RLE"


def mask_problem(segmentation, height, width):
    """(segmentation_problem's text or None; whether the mask is empty: an RLE without foreground, or
    polygons all wholly outside the image, from their bounds, nothing drawn), in one pass."""
    if isinstance(segmentation, dict):
        problem, foreground = _rle_problem(segmentation, height, width)
        return problem, foreground == 0
    problem = segmentation_problem(segmentation, height, width)
    return problem, problem is None and not any(
        max(p[0::2]) > 0 and min(p[0::2]) < width and max(p[1::2]) > 0 and min(p[1::2]) < height for p in segmentation)


# ------------------------------------------------------------------------------------------------
# the pass


def _check_task(task):
    """(ref, image, ann ids, image path | None, width, height, (segmentation, train?) | None) -> problems."""
    ref_id, image_id, ann_id, path, width, height, segmentation, instances_file = task
    problems = []
    if segmentation is not None:
        problem, empty = mask_problem(segmentation[0], height, width)
        if problem:
            problems.append(f"instances file '{instances_file}': annotation {ann_id} (ref {ref_id}): {problem}")
        elif empty and segmentation[1]:
            problems.append(('empty', ann_id))  # not a line: _check counts these per train ref
    if path is not None:
        problem = image_problem(path, width, height)
        if problem == 'not found':
            problems.append(f"image file '{path}' of ref {ref_id} not found")
        elif problem:
            problems.append(f"image file '{path}' (image {image_id}) of ref {ref_id} {problem}")
    return problems


def _check_chunk(tasks):
    return [p for task in tasks for p in _check_task(task)], len(tasks)


def _quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to report


def cpus_per_local_process():
    """This process's share of its CPUs: affinity mask / LOCAL_WORLD_SIZE (torchrun's, the SLURM jobs'), >= 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1') or 1)))


def _run(tasks, workers, desc):
    """Problems of all tasks, in task order; a process pool when it pays off."""
    from tqdm import tqdm
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    procs = min(int(workers), cpus_per_local_process(), len(chunks))
    problems = []
    # a bar only on a terminal (disable=None), so logs and tests stay clean
    with tqdm(total=len(tasks), desc=desc, unit=' refs', leave=False, disable=None, dynamic_ncols=True) as bar:
        if procs > 1 and len(tasks) >= PARALLEL_MIN_ITEMS:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context('fork' if 'fork' in methods else None)
            with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_quiet_worker) as pool:
                for found, n in pool.map(_check_chunk, chunks):
                    problems += found
                    bar.update(n)
        else:
            for chunk in chunks:
                found, n = _check_chunk(chunk)
                problems += found
                bar.update(n)
    return problems


def _tasks(refs, anns, images, image_dir, instances_file, check_images=True, check_masks=True):
    tasks, seen_images, seen_anns = [], set(), set()
    train_anns = {ref['ann_id'] for ref in refs if ref['split'] == 'train'}
    n_images = n_masks = 0
    for ref in refs:
        ann_id, image_id = ref['ann_id'], ref['image_id']
        ann, image = anns[ann_id], images.get(image_id, {})
        path = None
        if check_images and image_id not in seen_images:
            seen_images.add(image_id)
            path = os.path.join(image_dir, image['file_name'])
            n_images += 1
        segmentation = None
        if check_masks and ann_id not in seen_anns:
            seen_anns.add(ann_id)
            segmentation = (ann.get('segmentation'), ann_id in train_anns)
            n_masks += 1
        if path is not None or segmentation is not None:
            tasks.append((ref['ref_id'], image_id, ann_id, path, image.get('width'), image.get('height'),
                          segmentation, instances_file))
    return tasks, n_images, n_masks


def _refuse(refs, where, what):
    if refs:
        raise InputError(f"{where}: {len(refs)} train ref(s) with {what}, e.g. ref {refs[0]['ref_id']} "
                         f"(annotation {refs[0]['ann_id']}); fix or remove them")


def _check(refs, anns, images, image_dir, instances_file, workers, label, check_images, check_masks,
           refs_file='the refs file'):
    tic = time.perf_counter()
    train = [r for r in refs if r['split'] == 'train']
    _refuse([r for r in train if any(not s['raw'].strip() for s in r['sentences'])], f"refs file '{refs_file}'",
            "an empty expression ('' or only spaces)")
    tasks, n_images, n_masks = _tasks(refs, anns, images, image_dir, instances_file, check_images, check_masks)
    problems = _run(tasks, workers, f'checking {label}')
    errors = [p for p in problems if isinstance(p, str)]
    if errors:
        more = f' (and {len(errors) - 1} more problems in {label})' if len(errors) > 1 else ''
        raise InputError(errors[0] + more)
    empty = {p[1] for p in problems if not isinstance(p, str)}
    _refuse([r for r in train if r['ann_id'] in empty], f"instances file '{instances_file}'",
            'an empty mask (its polygons wholly outside the image, or an RLE without foreground)')
    what = ' and '.join(s for s in (f'{n_masks} masks' if check_masks else '',
                                    f'{n_images} image headers' if check_images else '') if s)
    logger.info(f'data check: {label}: {what} fine ({time.perf_counter() - tic:.1f}s)')
    return n_masks, n_images


def check_split_data(refer, refs, workers=0, label='data'):
    """Every ref's mask decodes at its image's size and every image header reads at the size
    instances.json gives and in a mode refer.images decodes, in one pass (a process pool of min(workers,
    CPUs) for large splits); no train ref has an empty mask or a blank expression. One InputError naming
    the first problem and how many more there are. -> (masks, images) checked."""
    return _check(refs, refer.Anns, refer.Imgs, refer.IMAGE_DIR, refer.instances_file, workers, label,
                  check_images=True, check_masks=True, refs_file=refer.refs_file)


def check_masks(refs, anns, images, instances_file, workers=0, label='masks', refs_file='the refs file'):
    """Masks only (no image files), for scripts that never open the images (mask_train_only.py)."""
    return _check(refs, anns, images, '', instances_file, workers, label, check_images=False, check_masks=True,
                  refs_file=refs_file)
