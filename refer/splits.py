"""The weak-expression splits of LRB-WREL (mask_train_only.py's machinery): the authors' algorithm, step for
step (see mask_train_only.py's docstring), in three parts: reading and checking refs + instances, the split in
memory (plans and views), and the files of a ratio (the six split files, ready data roots, the summary)."""
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from utils import InputError, check_input_file

VIEWS = ('all', 'no-mask', 'mask')
CATEGORY_KEYS = ('category_id', 'categories_id')  # RRSIS-D instances use `categories_id`
AUTHORS_RATIOS = (10, 30, 50, 70, 90)  # drawn in this order from one generator
N_EXAMPLES = 5          # the authors print 5 masked samples per ratio (and consume the random draws)
PICKLE_PROTOCOL = 4     # plain data only; readable by Python >= 3.4 and our restricted unpickler


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    refs: list                  # ref dicts, file order
    instances: dict             # the instances JSON object
    ann_category: dict          # annotation id -> category id (`category_id` or `categories_id`)
    cat_names: dict             # category id -> name (= the weak expression)
    images_dir: Path = None     # ROOT/images/<dataset> when it exists


def ratio_tag(ratio):
    """10.0 -> '10', 12.5 -> '12.5' (the authors' file names use whole percents)."""
    return str(int(ratio)) if float(ratio).is_integer() else repr(float(ratio))


def check_ratios(ratios):
    seen = set()
    for r in ratios:
        if not 0 < r < 100:
            raise InputError(f'--ratios: {ratio_tag(r)} is outside (0, 100)')
        if ratio_tag(r) in seen:
            raise InputError(f'--ratios: {ratio_tag(r)} is given twice')
        seen.add(ratio_tag(r))
    return sorted(ratios)  # the authors' order: ascending, one random stream


def load_inputs(refs_path, instances_path, images_dir=None, workers=1):
    """Read and check refs + instances as train.py does (fields, links, every ref's mask decodable at
    its image's size: `refer.check`), so broken refs are refused instead of copied into the splits;
    every problem is one InputError naming the file, the id and the field."""
    from refer.check import check_masks, check_ref_links
    from refer.refer import category_id_of, load_instances, load_refs

    for flag, path in (('--refs', refs_path), ('--instances', instances_path)):
        check_input_file(str(path), flag)  # missing, or a directory
    refs = load_refs(str(refs_path))                  # restricted unpickler; checks the ref keys
    instances = load_instances(str(instances_path))   # checks images / annotations / categories lists

    anns = instances['annotations']
    cat_names = {}
    for cat in instances['categories']:
        if 'id' not in cat or 'name' not in cat:
            raise InputError(f"{instances_path}: category {cat!r:.80} lacks 'id' or 'name'")
        cat_names[cat['id']] = cat['name']
    ann_category = {}
    for ann in anns:
        if 'id' not in ann:
            raise InputError(f"{instances_path}: an annotation has no 'id'")
        cat = category_id_of(ann)
        if cat is None:
            raise InputError(f"{instances_path}: annotation {ann['id']} has no category key "
                             f"({' or '.join(CATEGORY_KEYS)})")
        if cat not in cat_names:
            raise InputError(f"{instances_path}: annotation {ann['id']} has category {cat!r}, "
                             f"not in 'categories'")
        ann_category[ann['id']] = cat
    for ref in refs:
        if ref['ann_id'] not in ann_category:
            raise InputError(f"{refs_path}: ref {ref['ref_id']} points to annotation {ref['ann_id']}, "
                             f'which is not in {instances_path}')
    anns_by_id = {ann['id']: ann for ann in anns}
    images_by_id = {image['id']: image for image in instances['images']}
    check_ref_links(refs, anns_by_id, refs_path, instances_path, images=images_by_id)
    check_masks(refs, anns_by_id, images_by_id, instances_path, workers=workers, label='the refs\' masks',
                refs_file=refs_path)
    return Inputs(refs, instances, ann_category, cat_names,
                  images_dir if images_dir is not None and images_dir.is_dir() else None)


# ----------------------------------------------------------------------------------------------
# the split (pure, in memory)
# ----------------------------------------------------------------------------------------------
def weak_count(ratio, count):
    """int(ratio * count) in the authors' float arithmetic (e.g. 70 % of 90 -> 62, not 63).

    It equals floor(ratio * count / 100) for every RRSIS-D count; keeping the float form makes
    other datasets match the authors' files too."""
    return int(ratio / 100 * count)


@dataclass
class RatioPlan:
    ratio: float
    budget: int                                        # int(ratio * #train annotations)
    weak_per_category: dict                            # category id -> masked annotations
    masked_ann_ids: set
    example_ann_ids: list = field(default_factory=list)  # the authors' 5 displayed samples


def train_annotations(inputs):
    """Annotations that train refs point to, in instances order (the order the draws index)."""
    train_ids = {ref['ann_id'] for ref in inputs.refs if ref['split'] == 'train'}
    return [ann for ann in inputs.instances['annotations'] if ann['id'] in train_ids]


def plan_ratio(rng, ratio, train_anns, ann_category):
    by_category = {}  # insertion order = first appearance, the tie-break of the stable sort below
    for ann in train_anns:
        by_category.setdefault(ann_category[ann['id']], []).append(ann['id'])
    budget = weak_count(ratio, len(train_anns))
    remaining, weak = budget, {}
    masked = set()
    for cat, ids in sorted(by_category.items(), key=lambda kv: len(kv[1]), reverse=True):
        if remaining <= 0:
            break
        n = min(max(1, weak_count(ratio, len(ids))), remaining, len(ids))
        masked.update(ids[i] for i in rng.sample(range(len(ids)), n))
        weak[cat] = n
        remaining -= n
    masked_in_order = [ann['id'] for ann in train_anns if ann['id'] in masked]
    examples = [masked_in_order[i] for i in rng.sample(range(len(masked_in_order)),
                                                       min(N_EXAMPLES, len(masked_in_order)))]
    return RatioPlan(ratio, budget, weak, masked, examples)


def plan_splits(inputs, ratios, seed):
    """Plans for `ratios` (ascending); each one depends only on (seed, ratio).

    The authors draw 10, 30, 50, 70, 90 in turn from one generator seeded once, so e.g. the
    picks of 50 depend on the draws of 10 and 30. We replay that stream: a ratio r is drawn after
    the authors' ratios below r, whatever else was asked for; hence `--ratios 90` alone gives the
    authors' 90 split, and a ratio outside their list never shifts theirs."""
    train_anns = train_annotations(inputs)

    def replay(upto):
        rng, plans = random.Random(seed), {}
        for r in sorted(set(AUTHORS_RATIOS) | {upto}):
            plans[r] = plan_ratio(rng, r, train_anns, inputs.ann_category)
            if r == upto:
                return plans

    stream = replay(max(AUTHORS_RATIOS))
    return [stream[r] if r in stream else replay(r)[r] for r in sorted(ratios)]


def weaken(ref, name):
    """Every sentence says only the class name; `sent` keeps the original (the authors' files)."""
    return {**ref, 'sentences': [{**s, 'raw': name, 'tokens': name.split()} for s in ref['sentences']]}


def other_split_order(refs):
    splits = list(dict.fromkeys(ref['split'] for ref in refs if ref['split'] != 'train'))
    return sorted(splits, key=lambda s: {'val': 0, 'test': 1}.get(s, 2))  # stable: others keep file order


def make_views(inputs, plan):
    """{view: (refs list, instances dict)}; train refs/anns first (unmasked, then masked), then val, test.

    As in the authors' script, an annotation no ref points to that lies on no val/test image is
    left out of every view (RRSIS-D has none)."""
    anns = inputs.instances['annotations']
    refs = inputs.refs

    train_refs = [ref for ref in refs if ref['split'] == 'train']
    masked = plan.masked_ann_ids
    refs_nomask = [ref for ref in train_refs if ref['ann_id'] not in masked]
    refs_mask = [weaken(ref, inputs.cat_names[inputs.ann_category[ref['ann_id']]])
                 for ref in train_refs if ref['ann_id'] in masked]
    train_ann_ids = {ref['ann_id'] for ref in train_refs}
    anns_nomask = [ann for ann in anns if ann['id'] in train_ann_ids and ann['id'] not in masked]
    anns_mask = [ann for ann in anns if ann['id'] in masked]

    # val/test untouched: their refs in file order, their annotations = the non-train ones on
    # their images (as the authors select them), each annotation once
    refs_rest, anns_rest, taken = [], [], set()
    for split in other_split_order(refs):
        split_refs = [ref for ref in refs if ref['split'] == split]
        images = {ref['image_id'] for ref in split_refs}
        refs_rest += split_refs
        for ann in anns:
            if ann['id'] not in train_ann_ids and ann['id'] not in taken and ann.get('image_id') in images:
                anns_rest.append(ann)
                taken.add(ann['id'])

    def instances(view_anns):
        return {**inputs.instances, 'annotations': view_anns}
    return {
        'all': (refs_nomask + refs_mask + refs_rest, instances(anns_nomask + anns_mask + anns_rest)),
        'no-mask': (refs_nomask + refs_rest, instances(anns_nomask + anns_rest)),
        'mask': (refs_mask + refs_rest, instances(anns_mask + anns_rest)),
    }


def expression_counts(inputs, plan):
    """{category id: (accurate, weak)} train expressions (sentences) after the split."""
    counts = {}
    for ref in inputs.refs:
        if ref['split'] == 'train':
            acc, weak = counts.get(inputs.ann_category[ref['ann_id']], (0, 0))
            n = len(ref['sentences'])
            is_weak = ref['ann_id'] in plan.masked_ann_ids
            counts[inputs.ann_category[ref['ann_id']]] = (acc + n * (not is_weak), weak + n * is_weak)
    return counts


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def refs_name(split_by):
    return f'refs({split_by}).p'


def compact_json(obj):
    return json.dumps(obj, separators=(',', ':'))


class InstancesEncoder:
    """JSON text of instances dicts that differ only in their annotations list.

    Each annotation (and every other top-level value) is encoded once per run, not once per
    view: the 15 files of the default run share them. Output = compact_json(instances)."""

    def __init__(self, instances):
        self.parts = {k: compact_json(v) for k, v in instances.items() if k != 'annotations'}
        self.keys = list(instances)
        self.anns = {id(ann): compact_json(ann) for ann in instances['annotations']}  # by object: views share them

    def __call__(self, view_instances):
        encoded = (self.anns.get(id(ann)) or compact_json(ann) for ann in view_instances['annotations'])
        annotations = '[' + ','.join(encoded) + ']'
        return '{' + ','.join(f'{compact_json(k)}:{annotations if k == "annotations" else self.parts[k]}'
                              for k in self.keys) + '}'


def write_ratio(tmp_dir, inputs, plan, dataset, split_by, encode=None):
    tag = ratio_tag(plan.ratio)
    encode = encode or InstancesEncoder(inputs.instances)
    for view, (view_refs, view_instances) in make_views(inputs, plan).items():
        json_path = tmp_dir / f'instances-{tag}-{view}.json'
        refs_path = tmp_dir / f'refs({split_by})-{tag}-{view}.p'
        json_path.write_text(encode(view_instances))
        with open(refs_path, 'wb') as f:
            pickle.dump(view_refs, f, protocol=PICKLE_PROTOCOL)
        # a ready data root for --refer_data_root
        root = tmp_dir / f'{dataset}-{tag}-{view}'
        (root / dataset).mkdir(parents=True)
        link_or_copy(json_path, root / dataset / 'instances.json')
        link_or_copy(refs_path, root / dataset / refs_name(split_by))
        if inputs.images_dir is not None:
            (root / 'images').mkdir()
            # absolute: the link still resolves after OUT is moved or copied elsewhere
            os.symlink(inputs.images_dir.absolute(), root / 'images' / dataset, target_is_directory=True)


def link_or_copy(src, dst):
    """Hard link (no extra space; survives moving OUT or copying one data root alone)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def estimated_output_bytes(refs_path, instances_path, n_ratios):
    """Per ratio the three views hold every train record twice and the rest three times: at most
    3 x (refs + instances); the data roots are hard links."""
    return 3 * n_ratios * (os.path.getsize(refs_path) + os.path.getsize(instances_path))


def refuse_replacing_inputs(out_dir, overwrite, sources):
    """--overwrite replaces OUT whole: never when an input lives inside it."""
    if overwrite and out_dir.is_dir():
        for src in sources:
            if src is not None and src.resolve().is_relative_to(out_dir.resolve()):
                raise InputError(f'--output_dir: {out_dir} holds the input {src}; refusing to replace it')


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def summary_table(inputs, plans):
    """Train expressions per category (most frequent first): total, then accurate / weak per ratio."""
    per_ratio = [expression_counts(inputs, p) for p in plans]
    if not per_ratio or not per_ratio[0]:
        return '(no train expressions)'
    cats = sorted(per_ratio[0], key=lambda c: -sum(per_ratio[0][c]))
    width = max([len('category')] + [len(inputs.cat_names[c]) for c in cats])
    cell = max(13, len(str(sum(sum(v) for v in per_ratio[0].values()))) * 2 + 1)

    def row(name, total, cells):
        return f'{name:<{width}} {total:>6} ' + ' '.join(f'{c:>{cell}}' for c in cells)

    head = f"{'category':<{width}} {'train':>6} " + ' '.join(
        f"{'acc/weak@' + ratio_tag(p.ratio):>{cell}}" for p in plans)
    lines = [head, '-' * len(head)]
    lines += [row(inputs.cat_names[c], sum(per_ratio[0][c]), ['%d/%d' % counts[c] for counts in per_ratio])
              for c in cats]
    lines.append('-' * len(head))
    totals = [tuple(map(sum, zip(*counts.values()))) for counts in per_ratio]  # (accurate, weak)
    lines.append(row('all', sum(totals[0]), ['%d/%d' % t for t in totals]))
    lines.append(row('weak share', '', [f'{w / (a + w):.1%}' for a, w in totals]))
    return '\n'.join(lines)


def example_lines(inputs, plan):
    ref_by_ann = {}
    for ref in inputs.refs:
        if ref['split'] == 'train':
            ref_by_ann.setdefault(ref['ann_id'], ref)
    cat_of = inputs.ann_category
    lines = []
    for ann_id in plan.example_ann_ids:
        ref = ref_by_ann[ann_id]
        lines.append(f"  ref {ref['ref_id']}: {ref['sentences'][0].get('raw', '')!r} -> "
                     f'{inputs.cat_names[cat_of[ann_id]]!r}')
    return lines


def summary_record(inputs, plans, args, refs_path, instances_path):
    return {
        'seed': args.seed, 'dataset': args.dataset, 'splitBy': args.splitBy,
        'refs': str(refs_path.absolute()), 'instances': str(instances_path.absolute()),
        'ratios': {
            ratio_tag(p.ratio): {
                'budget': p.budget,
                'weak_annotations': len(p.masked_ann_ids),
                'expressions': {inputs.cat_names[c]: {'accurate': a, 'weak': w}
                                for c, (a, w) in expression_counts(inputs, p).items()},
            } for p in plans},
    }
