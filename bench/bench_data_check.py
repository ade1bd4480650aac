"""How long the up-front data check (refer/check.py) takes on the 17,402 real RRSIS-D refs.

    python bench/bench_data_check.py [--refs ../shared/rrsisd/refs(unc).p] [--workers 0 2] [--repeat 2]

The shared data has no annotations or images, so the script synthesizes them:
- masks: one polygon per ref (refer.demo_data.synthesize_instances, 800 x 800 images), and the same
  masks as compressed RLE;
- images: the bytes of one real 800 x 800 JPEG written under all 17,402 file names (the check reads
  headers only, so the content does not matter; the files are in the page cache, as on a second run).
It prints the time of each pass with `--workers` processes (0: in the main process).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from refer import check  # noqa: E402
from refer.demo_data import SHARED_RRSISD, load_categories, synthesize_instances  # noqa: E402
from refer.refer import REFER, load_refs  # noqa: E402
from utils import run_cli  # noqa: E402


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def to_rle(instances):
    """The same instances with every polygon replaced by its compressed RLE."""
    images = {im['id']: im for im in instances['images']}
    anns = []
    for ann in instances['annotations']:
        im = images[ann['image_id']]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], im['height'], im['width']))
        anns.append({**ann, 'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}})
    return {**instances, 'annotations': anns}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--refs', default=str(SHARED_RRSISD / 'refs(unc).p'))
    parser.add_argument('--categories', default=str(SHARED_RRSISD / 'categories.json'))
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    parser.add_argument('--repeat', type=int, default=2)
    args = parser.parse_args(argv)

    refs = load_refs(args.refs)
    categories = load_categories(args.categories)
    print(f'{len(refs)} refs; {check.cpus_per_local_process()} CPUs available')
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        polygons = synthesize_instances(refs, categories)
        for kind, instances in (('polygon', polygons), ('RLE', to_rle(polygons))):
            root = Path(tmp) / kind
            (root / 'rrsisd').mkdir(parents=True)
            os.symlink(os.path.abspath(args.refs), root / 'rrsisd' / 'refs(unc).p')
            (root / 'rrsisd' / 'instances.json').write_text(json.dumps(instances))
            (root / 'images').mkdir()
            os.symlink(Path(tmp) / 'images', root / 'images' / 'rrsisd')
            roots[kind] = root
        tic = time.perf_counter()
        image_dir = Path(tmp) / 'images' / 'JPEGImages'
        image_dir.mkdir(parents=True)
        jpeg = Path(tmp) / 'one.jpg'
        yy, xx = np.mgrid[0:800, 0:800]  # smooth content: a file size like RRSIS-D's, not noise's
        pixels = np.stack([xx * 255 // 800, yy * 255 // 800, (xx + yy) * 255 // 1600], -1).astype(np.uint8)
        Image.fromarray(pixels).save(jpeg, quality=90)
        data = jpeg.read_bytes()
        for ref in refs:
            (image_dir / ref['file_name']).write_bytes(data)
        print(f'set-up: synthesized polygons + RLE, {len(refs)} JPEGs of 800x800 ({len(data) // 1024} KB each) '
              f'in {time.perf_counter() - tic:.1f}s')

        print(f'--- best of {args.repeat} ---')
        for kind, root in roots.items():
            tic = time.perf_counter()
            refer = REFER(str(root), 'rrsisd', 'unc')
            print(f'REFER load + field checks ({kind})            {time.perf_counter() - tic:6.2f}s')
            all_refs = list(refer.Refs.values())
            for workers in args.workers:
                t = best_time(lambda: check.check_masks(all_refs, refer.Anns, refer.Imgs, refer.instances_file,
                                                        workers=workers), args.repeat)
                print(f'masks only, {kind:7s}, workers {workers}:  {len(all_refs)} masks      {t:6.2f}s')
        refer = REFER(str(roots['polygon']), 'rrsisd', 'unc')
        all_refs = list(refer.Refs.values())
        for workers in args.workers:
            t = best_time(lambda: check.check_split_data(refer, all_refs, workers=workers), args.repeat)
            print(f'masks + image headers, workers {workers}:  {len(all_refs)} refs       {t:6.2f}s')
        for workers in args.workers:  # what train.py does: the train split, then val
            def train_val():
                for split in ('train', 'val'):
                    check.check_split_data(refer, [refer.Refs[i] for i in refer.getRefIds(split=split)],
                                           workers=workers)
            t = best_time(train_val, args.repeat)
            print(f'train.py start-up (train + val), workers {workers}:       {t:6.2f}s')


if __name__ == '__main__':
    run_cli(main)
