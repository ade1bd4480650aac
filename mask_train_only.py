"""Build the weak-expression splits of LRB-WREL: a share of the train expressions becomes its class name.

    python mask_train_only.py --refer_data_root ROOT --dataset rrsisd --output_dir OUT \
        [--ratios 10 30 50 70 90] [--seed 42] [--instances FILE --refs FILE] [--overwrite]

`ratio` is the share of train annotations turned weak (90 gives the "10 % accurate" setting).
The algorithm is the authors' `mask_train_only.py`, step for step, so that the default call
(ratios 10 30 50 70 90, seed 42, Python's `random`) draws the same numbers as theirs:

- only the train split changes; its annotations are the ones train refs point to, in the order
  of `instances.json` (that order decides which annotations the random draws land on);
- per ratio, budget = int(ratio * #train annotations); categories are visited from the most to
  the least frequent in train (ties: first appearance in `instances.json`); each masks
  n = min(max(1, int(ratio * count)), remaining budget, count) annotations by `random.sample`;
- every sentence of a ref on a masked annotation gets `raw` = category name and `tokens` =
  name.split(); `sent` keeps the original sentence (as in the authors' published files);
- after each ratio the authors draw 5 masked annotations to print as examples; we draw and print
  them too, so the random stream of the next ratio stays the same;
- the authors draw their ratios 10, 30, 50, 70, 90 in turn from one generator; we replay that
  stream for every ratio asked for (see `plan_splits`), so a split depends only on (seed, ratio).

Per ratio XX it writes the authors' six files `instances-XX-{all,no-mask,mask}.json` and
`refs(<splitBy>)-XX-{all,no-mask,mask}.p` (mask: masked train + the other splits; no-mask: unmasked
train + the other splits; all: everything) and ready data roots
`OUT/<dataset>-XX-<view>/<dataset>/{instances.json, refs(<splitBy>).p}` (hard links to the six files)
with `OUT/<dataset>-XX-<view>/images/<dataset>` linked to the source images, plus `summary.json`.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ''):  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib.files import atomic_output_dir, check_free_space, check_writable_dir
from refer.splits import (InstancesEncoder, check_ratios, estimated_output_bytes, example_lines,
                          load_inputs, plan_splits, ratio_tag, refs_name, refuse_replacing_inputs,
                          summary_record, summary_table, train_annotations, write_ratio)
from utils import InputError, run_cli


def build_parser():
    parser = argparse.ArgumentParser(
        prog='mask_train_only.py',
        description='Turn a share of the train expressions into their category names '
                    '(the LRB-WREL weak-expression splits).')
    parser.add_argument('--refer_data_root', default='./refer/data/',
                        help='source data root: ROOT/<dataset>/{instances.json, refs(<splitBy>).p}, '
                             'images in ROOT/images/<dataset>')
    parser.add_argument('--dataset', default='rrsisd', help='dataset folder name (rrsisd, res_lad)')
    parser.add_argument('--splitBy', default='unc', help='refs file suffix: refs(<splitBy>).p')
    parser.add_argument('--output_dir', '--output-dir', required=True,
                        help='folder to create with the split files and data roots')
    parser.add_argument('--ratios', type=float, nargs='+', default=[10, 30, 50, 70, 90],
                        help='percent of train annotations turned weak, each in (0, 100)')
    parser.add_argument('--seed', type=int, default=42, help="random seed (the authors' is 42)")
    parser.add_argument('--instances', default=None, help='instances JSON (default ROOT/<dataset>/instances.json)')
    parser.add_argument('--refs', default=None, help='refs pickle (default ROOT/<dataset>/refs(<splitBy>).p)')
    parser.add_argument('--overwrite', action='store_true', help='replace an output dir that already holds files')
    return parser


# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    ratios = check_ratios(args.ratios)
    if not args.dataset or os.sep in args.dataset or args.dataset in ('.', '..'):
        raise InputError(f'--dataset: {args.dataset!r} is not a folder name')
    root = Path(args.refer_data_root)
    refs_path = Path(args.refs) if args.refs else root / args.dataset / refs_name(args.splitBy)
    instances_path = Path(args.instances) if args.instances else root / args.dataset / 'instances.json'
    images_dir = root / 'images' / args.dataset
    out_dir = Path(args.output_dir).absolute()
    refuse_replacing_inputs(out_dir, args.overwrite, [refs_path, instances_path, images_dir])
    check_writable_dir(out_dir, '--output_dir')  # output problems before reading anything
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise InputError(f'--output_dir {out_dir}: is not empty (pass --overwrite to replace it)')
    inputs = load_inputs(refs_path, instances_path, images_dir, workers=os.cpu_count() or 1)  # before writing
    if not train_annotations(inputs):  # nothing to turn weak: the splits would be copies without a train set
        raise InputError(f"refs file '{refs_path}': no train refs (split 'train'), so there is nothing to split")
    check_free_space(out_dir, estimated_output_bytes(refs_path, instances_path, len(ratios)), '--output_dir',
                     f'the split files of {len(ratios)} ratio(s)')
    plans = plan_splits(inputs, ratios, args.seed)
    with atomic_output_dir(out_dir, args.overwrite, flag='--output_dir') as tmp_dir:
        encode = InstancesEncoder(inputs.instances)
        for plan in plans:
            write_ratio(tmp_dir, inputs, plan, args.dataset, args.splitBy, encode)
        (tmp_dir / 'summary.json').write_text(
            json.dumps(summary_record(inputs, plans, args, refs_path, instances_path), indent=1))

    for plan in plans:
        print(f'ratio {ratio_tag(plan.ratio)} %: {len(plan.masked_ann_ids)} of '
              f'{len(train_annotations(inputs))} train annotations weak (budget {plan.budget}); examples:')
        print('\n'.join(example_lines(inputs, plan)))
    print(f'\ntrain expressions, accurate/weak per ratio (seed {args.seed}):')
    print(summary_table(inputs, plans))
    if inputs.images_dir is None:
        print(f'note: {images_dir} not found; data roots have no images link')
    print(f'\nwrote {out_dir} in {time.perf_counter() - start:.1f} s')
    return 0


if __name__ == '__main__':
    run_cli(main)
