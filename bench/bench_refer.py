"""How long REFER + dataset construction take on the 17,402 real RRSIS-D refs.

    python bench/bench_refer.py [--refs ../shared/rrsisd/refs(unc).p] [--bert_tokenizer DIR] [--repeat 3]

The shared data has no annotations or images, so the script synthesizes an instances.json for the refs.
The datasets are built without their up-front data check (masks and image headers), which
bench/bench_data_check.py times on real image files.
Without --bert_tokenizer it builds a small WordPiece tokenizer on the expressions first.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bert.build_small import build_small_bert  # noqa: E402
from bert.encoder import load_tokenizer  # noqa: E402
from refer.dataset import ReferDataset  # noqa: E402
from refer.demo_data import SHARED_RRSISD, load_categories, synthesize_instances  # noqa: E402
from refer.refer import REFER, load_refs  # noqa: E402
from utils import run_cli  # noqa: E402


def timed(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        tic = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - tic)
    return result, times


def report(name, times):
    print(f'{name:<38s} best {min(times) * 1e3:8.1f} ms   median {statistics.median(times) * 1e3:8.1f} ms')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--refs', default=str(SHARED_RRSISD / 'refs(unc).p'))
    parser.add_argument('--categories', default=str(SHARED_RRSISD / 'categories.json'))
    parser.add_argument('--bert_tokenizer', default='', help='tokenizer dir (default: build a small one)')
    parser.add_argument('--img_size', type=int, default=480)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)

    refs = load_refs(args.refs)
    categories = load_categories(args.categories)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'data'
        (root / 'rrsisd').mkdir(parents=True)
        os.symlink(os.path.abspath(args.refs), root / 'rrsisd' / 'refs(unc).p')
        tic = time.perf_counter()
        with open(root / 'rrsisd' / 'instances.json', 'w') as f:
            json.dump(synthesize_instances(refs, categories), f)
        print(f'set-up: {len(refs)} refs, synthesized instances.json in {time.perf_counter() - tic:.1f}s')

        if args.bert_tokenizer:
            tokenizer_dir = args.bert_tokenizer
        else:
            tokenizer_dir = Path(tmp) / 'bert'
            tic = time.perf_counter()
            build_small_bert([s['raw'] for r in refs for s in r['sentences']], tokenizer_dir, hidden_size=16,
                             num_hidden_layers=1, num_attention_heads=2)
            print(f'set-up: small tokenizer built in {time.perf_counter() - tic:.1f}s')
        tokenizer = load_tokenizer(tokenizer_dir)

        print(f'--- timings ({args.repeat} runs each) ---')
        refer, times = timed(lambda: REFER(str(root), 'rrsisd', 'unc'), args.repeat)
        report('REFER (load refs + instances, index)', times)
        total = min(times)
        for split, eval_mode in (('train', False), ('val', True), ('test', True)):
            ds, times = timed(lambda: ReferDataset(refer, split, tokenizer, args.img_size, eval_mode=eval_mode,
                                                   check_images=False), args.repeat)
            report(f'ReferDataset {split} ({len(ds)} refs)', times)
            total += min(times)
        print(f'REFER + train/val/test datasets (best): {total:.2f}s')


if __name__ == '__main__':
    run_cli(main)
