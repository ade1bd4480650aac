"""Throughput of the training DataLoader (decode, random boxes, resize, tokens), to show whether it
keeps up with the training step.

    python bench/bench_loader.py                                   # 800-px demo images, the paper's workers
    python bench/bench_loader.py --refer_data_root DATA --workers 2 -b 2 --train_images_per_s 40
    python bench/bench_loader.py --no_loader                       # the per-stage breakdown alone

Without --refer_data_root it generates demo data with 800-px JPEG images (RRSIS-D's size). The paper
runs `--workers 8` over 4 GPUs, i.e. 2 workers and a batch of 2 per process: the defaults here.

1. Per-stage breakdown of one train item (--no_stages skips it), in ms of this thread's CPU time per
   image (user + system, so page faults count; another tenant's load matters much less than with wall
   time). The stages are decode, random boxes, mask rasterization, image resize, image to tensor +
   normalize, mask resize + to tensor, token pick, and collate. Each stage is timed where the item
   pipeline runs it, on the reference's path (the three-step transform Compose([Resize, ToTensor,
   Normalize]) on PIL image and PIL mask, boxes through numpy) and on the current one
   (refer.transforms.ResizeToTensorNormalize, array masks, boxes filled by Pillow in place). Both give
   the same tensors bit for bit (tests/test_loader_speed_equivalence.py). "images/s per worker" is
   1000 / (item + collate ms): one worker on one core, before handing the batch over.
2. The hand-over (--transfer_images 0 skips it): the CPU the workers and the main process spend per image
   to pass items that decode nothing, with today's float32 image + int64 mask and with uint8 ones.
3. The loader itself, as training builds it (uint8 items, finished on the device: refer.transforms.finish_batch)
   for pinned and pageable memory, and with the float32 items of before (pageable): the time to the first batch (worker start-up, paid
   every epoch since workers are not persistent); the steady images/s of one process's loader; the CPU
   and page faults per image inside the workers' __getitem__; and all the workers' CPU per image. With
   --train_images_per_s, how many times faster than the training step the loader is.
"""
import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--refer_data_root', default='', help='a data root (default: generated demo data)')
    p.add_argument('--dataset', default='rrsisd')
    p.add_argument('--images', type=int, default=64, help='demo images to generate')
    p.add_argument('--image_px', type=int, default=800, help='demo image size')
    p.add_argument('--img_size', type=int, default=480, help='training input size')
    p.add_argument('-b', '--batch-size', type=int, default=2, help='per-process batch')
    p.add_argument('--workers', type=int, default=2, help='loader workers of one process')
    p.add_argument('--batches', type=int, default=20, help='timed batches after the first')
    p.add_argument('--stage_images', type=int, default=24, help='train items timed per stage')
    p.add_argument('--stage_repeats', type=int, default=5, help='runs per stage (the least is kept)')
    p.add_argument('--transfer_images', type=int, default=320,
                   help='items sent through the loader per layout in the transfer section (0: skip it)')
    p.add_argument('--no_loader', action='store_true', help='the per-stage breakdown only')
    p.add_argument('--no_stages', action='store_true', help='skip the per-stage breakdown')
    p.add_argument('--train_images_per_s', type=float, default=0.0,
                   help='images/s of the training step to compare with (e.g. from compare_original.py)')
    return p.parse_args(argv)


class TimedItems(torch.utils.data.Dataset):
    """The dataset's items, each with the CPU seconds and page faults its __getitem__ took in the worker
    that made it (keys `_cpu_s`, `_faults`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        before = resource.getrusage(resource.RUSAGE_THREAD)
        item = self.dataset[index]
        after = resource.getrusage(resource.RUSAGE_THREAD)
        item['_cpu_s'] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        item['_faults'] = after.ru_minflt - before.ru_minflt
        return item


def build_loader(data_root, dataset, img_size, batch, workers, pin_memory, tokenizer_dir, uint8_items=True):
    from bert.encoder import load_tokenizer
    from lib.training.data import build_train_loader
    from refer.dataset import build_dataset
    args = utils.get_parser().parse_args(['--refer_data_root', str(data_root), '--dataset', dataset,
                                          '--img_size', str(img_size), '--workers', str(workers)])
    train_set = build_dataset(args, 'train', load_tokenizer(str(tokenizer_dir)), eval_mode=False,
                              uint8_items=uint8_items)
    return build_train_loader(TimedItems(train_set), batch, workers, seed=0, pin_memory=pin_memory)


# --- per-stage breakdown (one process, thread CPU time) ---------------------------------------------

def cpu_ms_per_item(fn, items, repeats):
    """This thread's CPU ms per item of `fn(item)`, the least over `repeats` runs."""
    best = float('inf')
    for _ in range(repeats):
        start = time.thread_time()
        for item in items:
            fn(item)
        best = min(best, (time.thread_time() - start) * 1e3 / len(items))
    return best


class Laps:
    """Thread CPU time per named stage, accumulated over items: `lap(name)` charges the time since the
    previous lap to `name`."""

    def __init__(self):
        self.ms, self.last = {}, time.thread_time()

    def lap(self, name):
        now = time.thread_time()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self.last) * 1e3
        self.last = now


def numpy_boxes(image, size, generator=None):
    """The reference's random boxes: PIL -> numpy copy, slices set to 0, numpy -> PIL copy."""
    import numpy as np
    from PIL import Image
    pixels = np.array(image)
    h, w = pixels.shape[:2]
    num = int(torch.randint(20, 61, (1,), generator=generator))
    ys = torch.randint(0, max(h - size, 0) + 1, (num,), generator=generator).tolist()
    xs = torch.randint(0, max(w - size, 0) + 1, (num,), generator=generator).tolist()
    for y, x in zip(ys, xs):
        pixels[y:y + size, x:x + size] = 0
    return Image.fromarray(pixels)


def decode_jpeg_identical(paths):
    """How many of the JPEGs at `paths` torchvision.io.decode_jpeg decodes to exactly Pillow's pixels."""
    import numpy as np
    from torchvision.io import decode_jpeg, read_file
    from refer.images import open_rgb
    return sum(np.array_equal(np.asarray(open_rgb(p)), decode_jpeg(read_file(p)).permute(1, 2, 0).numpy())
               for p in paths)


STAGES = ('decode (Pillow, to RGB)', 'random boxes', 'mask rasterization (getMask)', 'image resize (Pillow bilinear)',
          'image to tensor + normalize', 'mask resize + to tensor', 'token pick')


def stage_breakdown(ds, tokenizer, repeats, n_images, batch, log=print):
    """Per-stage CPU ms per image of `ds`'s first `n_images` train items, on the reference's path and on
    the current one, each stage timed where the item pipeline runs it (so with its real allocation
    pattern; Python's cyclic collector off meanwhile); the whole item, collate, tokenization. Logs the
    table; returns the figures."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import default_collate
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    from refer.dataset import occlusion_box_size, tokenize_sentences
    from refer.transforms import IMAGENET_MEAN, IMAGENET_STD, add_random_boxes, resize_mask_nearest

    refer, size = ds.refer, ds.transform.size
    indices = list(range(min(n_images, len(ds))))
    refs = [refer.Refs[ds.ref_ids[i]] for i in indices]
    paths = [refer.image_path(ref) for ref in refs]
    n_boxed = sum(ref['ref_id'] in ds.boxed_ref_ids for ref in refs)

    def pick_tokens(index, draws):  # the per-item token work of ReferDataset.__getitem__ (train mode)
        rows = ds.sentence_rows(index)
        row = rows[int(torch.randint(len(rows), (1,), generator=draws))]
        return ds.input_ids[row].clone(), ds.attention_mask[row].clone()

    def reference_item(index, t):  # ReferDataset.__getitem__ as it was: numpy boxes, PIL mask, 3-step transform
        draws = ds.item_generator(index)  # the item's draws: boxes, then its sentence
        ref = refer.Refs[ds.ref_ids[index]]
        image = ds.load_image(ref)
        t.lap(STAGES[0])
        if ref['ref_id'] in ds.boxed_ref_ids:
            image = numpy_boxes(image, occlusion_box_size(*image.size), draws)
        t.lap(STAGES[1])
        mask = refer.getMask(ref)['mask']
        t.lap(STAGES[2])
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR)
        t.lap(STAGES[3])
        image = F.normalize(F.to_tensor(image), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        t.lap(STAGES[4])
        target = F.resize(Image.fromarray(mask), size, interpolation=InterpolationMode.NEAREST)
        target = torch.as_tensor(np.array(target), dtype=torch.int64)
        t.lap(STAGES[5])
        tokens = pick_tokens(index, draws)
        t.lap(STAGES[6])
        return image, target, tokens

    def current_item(index, t):  # ReferDataset.__getitem__ now, stage by stage
        draws = ds.item_generator(index)  # the item's draws: boxes, then its sentence
        ref = refer.Refs[ds.ref_ids[index]]
        image = ds.load_image(ref)
        t.lap(STAGES[0])
        if ref['ref_id'] in ds.boxed_ref_ids:
            image = add_random_boxes(image, size=occlusion_box_size(*image.size), generator=draws, inplace=True)
        t.lap(STAGES[1])
        mask = refer.getMask(ref)['mask']
        t.lap(STAGES[2])
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR)
        t.lap(STAGES[3])
        image = ds.transform.normalized(image)
        t.lap(STAGES[4])
        target = resize_mask_nearest(mask, *size)
        t.lap(STAGES[5])
        tokens = pick_tokens(index, draws)
        t.lap(STAGES[6])
        return image, target, tokens

    for index in indices[:4]:  # the stage-by-stage copies compute what the dataset computes
        item = ds[index]
        for fn in (reference_item, current_item):
            image, target, (input_ids, _) = fn(index, Laps())
            assert torch.equal(image, item['image']) and torch.equal(target, item['target']), fn.__name__
            assert torch.equal(input_ids, item['input_ids']), fn.__name__

    best = {'reference': None, 'current': None, 'dataset[i]': float('inf')}
    gc.collect()
    gc.disable()  # a collection would land on whichever stage allocates at the time
    try:
        for _ in range(repeats):  # the paths take turns, so they see the same conditions; the least total is kept
            for name, fn in (('reference', reference_item), ('current', current_item)):
                t = Laps()
                for index in indices:
                    fn(index, t)
                if best[name] is None or sum(t.ms.values()) < sum(best[name].values()):
                    best[name] = dict(t.ms)
            start = time.thread_time()
            for index in indices:
                ds[index]
            best['dataset[i]'] = min(best['dataset[i]'], (time.thread_time() - start) * 1e3 / len(indices))
    finally:
        gc.enable()
    stages = {k: (best['reference'][k] / len(indices), best['current'][k] / len(indices)) for k in STAGES}

    items = [ds[i] for i in range(min(batch, len(ds)))]
    collate_ms = cpu_ms_per_item(lambda _: default_collate(items), [0] * 8, repeats) / len(items)
    stages[f'collate (batch of {len(items)})'] = (collate_ms, collate_ms)
    totals = tuple(sum(v[i] for v in stages.values()) for i in (0, 1))
    per_worker = tuple(1e3 / total for total in totals)

    read_ms = cpu_ms_per_item(lambda p: open(p, 'rb').read(), paths, repeats)
    raws = [sent['raw'] for ref_id in ds.ref_ids for sent in refer.Refs[ref_id]['sentences']]
    start = time.thread_time()
    tokenize_sentences(tokenizer, raws, ds.max_tokens)
    tokenize_ms = (time.thread_time() - start) * 1e3 / len(raws)
    jpegs = all(p.lower().endswith(('.jpg', '.jpeg')) for p in paths)
    identical = decode_jpeg_identical(paths) if jpegs else None
    tv_decode = cpu_ms_per_item(lambda p: decode_jpeg(read_file(p)), paths, repeats) if jpegs else None

    width = max(len(k) for k in stages) + 16
    with Image.open(paths[0]) as first:
        shape = f'{first.size[0]}x{first.size[1]}'
    log(f'per-stage CPU ms per image ({len(indices)} train items, {n_boxed} with boxes, images {shape}, '
        f'{size[0]} px; the least of {repeats} runs; 1 thread):')
    log(f'  {"stage":<{width}}{"reference":>10}{"current":>10}')
    for name, (ref_ms, cur_ms) in stages.items():
        label = f'{name} ({n_boxed}/{len(indices)} items)' if name == 'random boxes' else name
        log(f'  {label:<{width}}{ref_ms:>10.3f}{cur_ms:>10.3f}')
    log(f'  {"item + collate":<{width}}{totals[0]:>10.3f}{totals[1]:>10.3f}')
    log(f'  {"images/s per worker (no transfer)":<{width}}{per_worker[0]:>10.1f}{per_worker[1]:>10.1f}')
    log(f'  dataset[i] as a whole: {best["dataset[i]"]:.3f} ms; file read (within decode): {read_ms:.3f} ms; '
        f'tokenization, once per sentence at start-up: {tokenize_ms:.3f} ms ({len(raws)} sentences, one call)')
    if jpegs:
        log(f'  torchvision.io.decode_jpeg (not used): {tv_decode:.3f} ms, pixels equal to Pillow\'s on '
            f'{identical}/{len(paths)} images')
    return {'stages': stages, 'item_and_collate_ms': totals, 'images_per_s_per_worker': per_worker,
            'dataset_item_ms': best['dataset[i]'], 'file_read_ms': read_ms, 'tokenize_ms_per_sentence': tokenize_ms,
            'decode_jpeg_ms': tv_decode, 'decode_jpeg_identical': identical}


# --- what the loader's inter-process transfer costs, by item layout -----------------------------------

class TemplateItems(torch.utils.data.Dataset):
    """`n` items, each a fresh copy of the given image and target tensors (nothing decoded)."""

    def __init__(self, image, target, n):
        self.image, self.target, self.n = image, target, n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {'image': self.image.clone(), 'target': self.target.clone()}


def transfer_cost(img_size, batch, workers, n_images, log=print):
    """CPU ms per image of handing items from `workers` loader workers to the main process: in the
    workers (item copy, collate into shared memory, send) and in the main process (receive, one read of
    every byte into a reused buffer, as a pin-memory copy or a host-to-device copy does). The layout of
    before (float32 image, int64 mask) against the train loader's uint8 one (4 + 8 times fewer bytes; the
    device normalizes: refer.transforms.finish_batch)."""
    s = img_size
    layouts = {'float32 image + int64 mask (before)': (torch.zeros(3, s, s), torch.zeros(s, s, dtype=torch.int64)),
               'uint8 image + uint8 mask (the train loader now)': (torch.zeros(3, s, s, dtype=torch.uint8),
                                            torch.zeros(s, s, dtype=torch.uint8))}
    figures = {}
    for name, (image, target) in layouts.items():
        loader = torch.utils.data.DataLoader(TemplateItems(image, target, n_images), batch_size=batch,
                                             num_workers=workers, drop_last=True)
        buffers = None
        workers_before, main_before = children_cpu_s(), time.process_time()
        faults_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        n = 0
        for b in loader:
            if buffers is None:
                buffers = {k: torch.empty_like(v) for k, v in b.items()}
            for k, v in b.items():
                buffers[k].copy_(v)
            n += b['image'].shape[0]
        del b, loader
        gc.collect()
        figures[name] = {'workers_cpu_ms': (children_cpu_s() - workers_before) * 1e3 / n,
                         'workers_page_faults': (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
                                                 - faults_before) / n,
                         'main_cpu_ms': (time.process_time() - main_before) * 1e3 / n,
                         'bytes_per_image': image.numel() * image.element_size() + target.numel() * target.element_size()}
        f = figures[name]
        log(f'transfer {workers} workers, batch {batch}, {s} px, {name}: {f["bytes_per_image"] / 2 ** 20:.2f} MiB '
            f'per image; workers {f["workers_cpu_ms"]:.2f} ms ({f["workers_page_faults"]:.0f} page faults), '
            f'main process {f["main_cpu_ms"]:.2f} ms CPU per image')
    return figures


def children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # exited, reaped children: the loader's workers
    return usage.ru_utime + usage.ru_stime


def measure(loader, batches):
    """-> {first_batch_s, images_per_s (steady, over `batches` batches after the first), item_cpu_ms and
    item_faults (per image, inside the workers' __getitem__), worker_cpu_ms (all the workers' CPU per
    image delivered)}. The workers' CPU is read once they have exited (workers are not persistent): it
    includes their start-up and the batches prefetched but not taken, so it is an upper bound; what it
    has beyond the items is mostly the hand-over (collate into shared memory, send)."""
    cpu_before = children_cpu_s()
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    to_first = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    item_cpu_s, item_faults = float(first['_cpu_s'].sum()), int(first['_faults'].sum())
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # a short epoch: start the next one (its start-up is counted too)
            it = iter(loader)
            batch = next(it)
        n += batch['image'].shape[0]
        item_cpu_s += float(batch['_cpu_s'].sum())
        item_faults += int(batch['_faults'].sum())
    images_per_s = n / (time.perf_counter() - start)
    delivered = n + first['image'].shape[0]
    del first, batch, it  # shuts the workers down (joined, so their CPU time is counted)
    gc.collect()
    return {'first_batch_s': to_first, 'images_per_s': images_per_s, 'item_cpu_ms': item_cpu_s * 1e3 / delivered,
            'item_faults': item_faults / delivered,
            'worker_cpu_ms': (children_cpu_s() - cpu_before) * 1e3 / delivered}


def run(args, log=print):
    """-> {'stages': {...}, 'pinned': {...}, 'pageable': {...}, 'float32 items, pageable': {...}, ...}; generates demo data and a tokenizer
    when needed."""
    from bert.build_small import build_small_bert, collect_expressions
    from bert.encoder import load_tokenizer
    from refer.dataset import build_dataset
    with tempfile.TemporaryDirectory(prefix='bench_loader_') as tmp:
        root = args.refer_data_root
        if not root:
            from refer.demo_data import generate
            root = Path(tmp) / 'data'
            generate(root, images=args.images, size=args.image_px, seed=0)
        tokenizer_dir = Path(tmp) / 'tokenizer'
        build_small_bert(collect_expressions(root, args.dataset, 'unc'), tokenizer_dir, hidden_size=8,
                         num_hidden_layers=1, num_attention_heads=1)
        figures = {'workers': args.workers, 'batch': args.batch_size, 'img_size': args.img_size,
                   'source': args.refer_data_root or f'demo data, {args.image_px}-px JPEG'}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker
        try:
            tokenizer = load_tokenizer(str(tokenizer_dir))
            data_args = utils.get_parser().parse_args(['--refer_data_root', str(root), '--dataset', args.dataset,
                                                       '--img_size', str(args.img_size), '--workers', '0'])
            train_set = build_dataset(data_args, 'train', tokenizer, eval_mode=False)
            if not args.no_stages:
                figures['stages'] = stage_breakdown(train_set, tokenizer, args.stage_repeats, args.stage_images,
                                                    args.batch_size, log)
        finally:
            torch.set_num_threads(threads)
        if args.no_loader:
            return figures
        if args.transfer_images and args.workers:
            figures['transfer'] = transfer_cost(args.img_size, args.batch_size, args.workers, args.transfer_images, log)
        # items as training hands them over (uint8, finished on the device), pageable and pinned, and as before
        # (float32 image, int64 mask); the device's finishing (engine.to_device) is not in these figures
        for uint8_items, pinned in ((True, False), (True, True), (False, False)):
            loader = build_loader(root, args.dataset, args.img_size, args.batch_size, args.workers,
                                  pinned and torch.cuda.is_available(), tokenizer_dir, uint8_items)
            m = measure(loader, args.batches)
            key = 'pinned' if pinned else 'pageable'
            if pinned and not torch.cuda.is_available():
                key = 'pinned (no CUDA: not pinned)'
            key = key if uint8_items else 'float32 items, ' + key
            figures[key] = m
            images_per_s = m['images_per_s']
            line = (f'loader {args.workers} workers, batch {args.batch_size}, {args.img_size} px, {key}: '
                    f'{images_per_s:.1f} images/s, first batch after {m["first_batch_s"]:.2f} s; per image '
                    f'{m["item_cpu_ms"]:.1f} ms CPU in __getitem__ ({m["item_faults"]:.0f} page faults)')
            if args.workers:
                line += f', workers\' CPU <= {m["worker_cpu_ms"]:.1f} ms'
            if args.train_images_per_s:
                figures[key]['headroom'] = images_per_s / args.train_images_per_s
                line += f' ({images_per_s / args.train_images_per_s:.1f}x the training step\'s ' \
                        f'{args.train_images_per_s:.1f} images/s)'
            log(line)
            del loader
    return figures


def main(argv=None):
    args = get_args(argv)
    if min(args.batch_size, args.batches, args.images, args.stage_images, args.stage_repeats) < 1 \
            or min(args.workers, args.transfer_images) < 0:
        raise utils.InputError('--batch-size, --batches, --images, --stage_images and --stage_repeats must be '
                               '>= 1, --workers and --transfer_images >= 0')
    run(args)


if __name__ == '__main__':
    utils.run_cli(main)
