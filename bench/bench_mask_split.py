"""Time mask_train_only.py on the real RRSIS-D refs and compare it with the authors' published splits.

    python bench/bench_mask_split.py [--refs ../shared/rrsisd/refs(unc).p] [--instances FILE]
                                     [--published DIR]

Without --instances, an instances.json is synthesized (one polygon per ref, refer.demo_data).
--published: a folder with the authors' `refs(unc)-{50,70,90}-{all,no-mask,mask}.p`, e.g.
    R=/work/.mirror/AHideoKuzeA+LRB-WREL/repo; mkdir -p /tmp/pub
    for f in $(git -C $R ls-tree --name-only HEAD rrsisd-mask/ | grep '\\.p$'); do
        git -C $R show "HEAD:$f" > "/tmp/pub/$(basename "$f")"; done
It then prints
  1. per-category weak counts: ours vs theirs;
  2. whether our seed-42 random stream is theirs, independently of the annotation order: the
     positions our draws pick inside each category must split into the same numbers of
     masked-at-(50, 70, 90) patterns as their annotations do;
  3. exact chosen ref ids: the picks index the train annotations of a category in the order of
     `instances.json`, which the shared data lacks (the authors' instances file is not published).
     We recover, per category, the order their draws imply, check that it agrees with the order
     of their refs files, and rerun our split on an instances file in that order.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mask_train_only as mto  # noqa: E402
from refer import splits  # noqa: E402
from refer.demo_data import load_categories, synthesize_instances  # noqa: E402
from refer.refer import load_refs  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'rrsisd'


def write_root(root, refs_path, instances):
    (root / 'rrsisd').mkdir(parents=True)
    (root / 'rrsisd' / 'refs(unc).p').symlink_to(Path(refs_path).absolute())
    (root / 'rrsisd' / 'instances.json').write_text(json.dumps(instances))
    return root


def timed(fn, *args):
    """(result, 'wall s (cpu s)'): CPU time too, as the wall clock depends on who else runs."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, f'{time.perf_counter() - wall:.2f} s ({time.process_time() - cpu:.2f} s CPU)'


def published_views(folder, ratios):
    views = {}
    for r in ratios:
        for v in splits.VIEWS:
            path = Path(folder) / f'refs(unc)-{r}-{v}.p'
            if path.is_file():
                views[r, v] = load_refs(str(path))
    return views


def stream_positions(inputs, seed):
    """Our draws as (category, index within the category's train annotations), per authors' ratio."""
    train = splits.train_annotations(inputs)
    k = Counter()
    fake, fake_cat = [], {}
    for ann in train:
        cat = inputs.ann_category[ann['id']]
        fake.append({'id': (cat, k[cat])})
        fake_cat[(cat, k[cat])] = cat
        k[cat] += 1
    rng = random.Random(seed)
    return {r: splits.plan_ratio(rng, r, fake, fake_cat).masked_ann_ids for r in splits.AUTHORS_RATIOS}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--refs', default=str(SHARED / 'refs(unc).p'))
    parser.add_argument('--categories', default=str(SHARED / 'categories.json'))
    parser.add_argument('--instances', default=None, help='real instances.json (default: synthesized)')
    parser.add_argument('--published', default=None, help="folder with the authors' refs(unc)-XX-*.p")
    parser.add_argument('--seed', type=int, default=42)
    args = parser.parse_args()

    refs = load_refs(args.refs)
    if args.instances:
        instances = json.loads(Path(args.instances).read_text())
    else:
        instances = synthesize_instances(refs, load_categories(args.categories))
    with tempfile.TemporaryDirectory() as tmp:
        root = write_root(Path(tmp) / 'data', args.refs, instances)
        out = Path(tmp) / 'out'
        data = root / 'rrsisd'
        inputs, t_load = timed(splits.load_inputs, data / 'refs(unc).p', data / 'instances.json')
        plans, t_plan = timed(splits.plan_splits, inputs, splits.AUTHORS_RATIOS, args.seed)
        _, t_all = timed(mto.main, ['--refer_data_root', str(root), '--output_dir', str(out)])
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f'\n{len(refs)} refs, {len(instances["annotations"])} annotations: load+check {t_load}, '
          f'plan 5 ratios {t_plan}, end-to-end (6 files x 5 ratios, {size / 2**20:.0f} MiB) {t_all}')

    if not args.published:
        return
    pub = published_views(args.published, splits.AUTHORS_RATIOS)
    ratios = sorted({r for r, _ in pub})
    plan = {p.ratio: p for p in plans}
    masked = {r: {x['ann_id'] for x in pub[r, 'mask'] if x['split'] == 'train'} for r in ratios}

    print(f'\n1. per-category weak counts vs the published files (ratios {ratios}):')
    for r in ratios:
        ours = Counter(inputs.ann_category[a] for a in plan[r].masked_ann_ids)
        theirs = Counter(inputs.ann_category[a] for a in masked[r])
        print(f'   {r}: ours {sum(ours.values())}, theirs {sum(theirs.values())}, '
              f'equal in every category: {ours == theirs}')

    positions = stream_positions(inputs, args.seed)
    by_cat = defaultdict(list)
    for ann in splits.train_annotations(inputs):
        by_cat[inputs.ann_category[ann['id']]].append(ann['id'])
    consistent = 0
    slots = {}
    for cat, ids in by_cat.items():
        slot_sig = [tuple((cat, i) in positions[r] for r in ratios) for i in range(len(ids))]
        ann_sig = {a: tuple(a in masked[r] for r in ratios) for a in ids}
        consistent += Counter(slot_sig) == Counter(ann_sig.values())
        slots[cat] = (slot_sig, ann_sig)
    print(f'2. seed {args.seed} stream = the authors\' (order-free test): {consistent}/{len(by_cat)} categories')

    # 3. recover each category's annotation order: annotations with the same pattern sit in the
    # same views, so their order there is theirs; the slots' patterns say how the groups interleave
    file_pos = {k: {x['ref_id']: i for i, x in enumerate(v)} for k, v in pub.items()}
    all_pos = file_pos[ratios[0], 'all']
    ref_of_ann = {x['ann_id']: x['ref_id'] for x in refs}
    order, violations = {}, 0
    for cat, (slot_sig, ann_sig) in slots.items():
        groups = defaultdict(list)
        for a, sig in ann_sig.items():
            groups[sig].append(a)
        for g in groups.values():
            g.sort(key=lambda a: all_pos[ref_of_ann[a]])
        taken = Counter()
        order[cat] = []
        for sig in slot_sig:
            order[cat].append(groups[sig][taken[sig]])
            taken[sig] += 1
        for (_, view), fp in file_pos.items():  # mask / no-mask keep their refs file's order
            if view == 'all':  # (all = no-mask train + mask train: not an order check)
                continue
            seq = [fp[ref_of_ann[a]] for a in order[cat] if ref_of_ann[a] in fp]
            violations += seq != sorted(seq)
    # same slots per category, filled in the recovered order
    next_of = {cat: iter(ids) for cat, ids in order.items()}
    train_ids = {a for ids in order.values() for a in ids}
    ann_by_id = {a['id']: a for a in instances['annotations']}
    reordered = [ann_by_id[next(next_of[inputs.ann_category[a['id']]])] if a['id'] in train_ids else a
                 for a in instances['annotations']]
    inputs2 = splits.Inputs(inputs.refs, {**instances, 'annotations': reordered},
                         inputs.ann_category, inputs.cat_names)
    plans2 = {p.ratio: p for p in splits.plan_splits(inputs2, splits.AUTHORS_RATIOS, args.seed)}
    print(f'3. recovered per-category order disagrees with the published files\' order in {violations} of '
          f'{len(slots) * 2 * len(ratios)} checks; with it, our split gives exactly their refs:')
    for r in ratios:
        views = splits.make_views(inputs2, plans2[r])
        same = [{x['ref_id']: x for x in views[v][0]} == {x['ref_id']: x for x in pub[r, v]} for v in splits.VIEWS]
        print(f'   {r}: chosen ids equal {plans2[r].masked_ann_ids == masked[r]}; '
              + ', '.join(f'{v} ref dicts equal {s}' for v, s in zip(splits.VIEWS, same)))
    ours_direct = sum(plan[r].masked_ann_ids == masked[r] for r in ratios)
    print(f'   (with the instances order as given, not recovered: exact ids equal for '
          f'{ours_direct}/{len(ratios)} ratios)')


if __name__ == '__main__':
    main()
