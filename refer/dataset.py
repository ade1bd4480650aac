"""The referring-segmentation dataset used by every script.

Item (a dict; the default collate works):
    image           float32 [3, S, S]   resized to img_size x img_size, ImageNet-normalized
    target          int64   [S, S]      {0, 1}, nearest resize
    input_ids       int64   [20]        train: one sentence chosen at random
                            [K, 20]     eval: all K sentences of the ref
    attention_mask  int64   same shape as input_ids, 1 on real tokens
    ref_id          int
    index           int                 position in the dataset
    is_weak         bool (train) / bool [K] (eval): the sentence is just the class name, i.e. its
                    expression was replaced by the category name (see mask_train_only.py)

With uint8_items=True (the train loader's) image and target leave the worker as uint8 ([3, S, S] resized,
not normalized; [S, S]) and `refer.transforms.finish_batch` makes the tensors above on the training
device, bit for bit.

Token ids follow the reference exactly: encode with [CLS]/[SEP], cut at 20 (a long sentence loses
its [SEP]), pad with 0. All sentences are tokenized once, in one batched call of a fast tokenizer.
Random boxes (on by default, as the reference): a fixed, seeded 20% of the train split's refs get
20-60 random black boxes on the original-resolution image, fresh positions on every load.

A train item's draws (its sentence, its boxes) come from a generator seeded by (seed, epoch, index) alone
(`set_epoch`, called by the training loop), not from the global RNG of whichever process or loader worker
makes it: the same run draws the same data with any --workers and any number of processes, and a resumed
run draws what the uninterrupted one did.
"""
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils import InputError

from .check import check_split_data, cpus_per_local_process
from .images import open_rgb
from .refer import REFER, category_id_of
from .transforms import add_random_boxes, build_transform

BOXED_FRACTION = 0.2  # the reference occludes a fixed 20% of the training refs
BOX_SIZE, BOX_REFERENCE_SIDE = 32, 800  # 32-px boxes on RRSIS-D's 800 x 800 images


def occlusion_box_size(width, height):
    """32 px as the reference on images of 800 px and more; proportionally smaller on smaller
    images (the demo's 128 px), so the occluded fraction stays what the reference intends."""
    return max(1, round(BOX_SIZE * min(1.0, min(width, height) / BOX_REFERENCE_SIDE)))


def is_weak_sentence(raw, category_name):
    """A weak sentence is the bare class name (compared lowercased, stripped)."""
    return raw.strip().lower() == category_name.strip().lower()


def encode_batch(tokenizer, sentences):
    """Token ids with [CLS]/[SEP] of each sentence, in one batched call. The Rust backend is called
    directly when it has no padding/truncation set: same ids, half the Python overhead."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return [e.ids for e in backend.encode_batch(list(sentences), add_special_tokens=True)]
    return tokenizer(list(sentences), add_special_tokens=True, return_attention_mask=False,
                     return_token_type_ids=False)['input_ids']


def tokenize_sentences(tokenizer, sentences, max_tokens=20):
    """(input_ids, attention_mask), int64 [N, max_tokens] each, for N sentences."""
    input_ids = np.zeros((len(sentences), max_tokens), dtype=np.int64)  # pad id 0, as the reference
    lengths = np.zeros(len(sentences), dtype=np.int64)
    for i, ids in enumerate(encode_batch(tokenizer, sentences) if sentences else []):
        ids = ids[:max_tokens]  # cut after adding [SEP], as the reference: long sentences lose it
        input_ids[i, :len(ids)] = ids
        lengths[i] = len(ids)
    attention_mask = (np.arange(max_tokens)[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


class ReferDataset(Dataset):
    def __init__(self, refer, split, tokenizer, img_size, eval_mode=False, random_boxes=True,
                 max_tokens=20, seed=0, transform=None, check_images=True, check_workers=0, uint8_items=False):
        """check_images: before anything else, check every mask and image header of the split
        (`refer.check.check_split_data`, on a pool of `check_workers` processes); False skips it.
        uint8_items: image and target as uint8, for `refer.transforms.finish_batch` (module docstring)."""
        if not isinstance(img_size, int) or img_size <= 0:
            raise InputError(f'--img_size must be a positive integer, got {img_size!r}')
        self.refer = refer
        self.split = split
        self.eval_mode = eval_mode
        self.max_tokens = max_tokens
        self.transform = transform or build_transform(img_size, uint8=uint8_items)
        self.ref_ids = refer.getRefIds(split=split)
        if not self.ref_ids:
            raise InputError(f"split '{split}' has no refs in '{refer.refs_file}' (--split)")

        refs = [refer.Refs[ref_id] for ref_id in self.ref_ids]
        for ref in refs:
            if not ref['sentences']:
                raise InputError(f"ref {ref['ref_id']} has no sentences in '{refer.refs_file}'")
        if check_images:
            check_split_data(refer, refs, workers=check_workers, label=f"split '{split}'")

        # all sentences in one flat table; ref i owns rows offsets[i]:offsets[i + 1]
        raws = [sent['raw'] for ref in refs for sent in ref['sentences']]
        self.input_ids, self.attention_mask = tokenize_sentences(tokenizer, raws, max_tokens)  # [N, T]
        counts = torch.tensor([len(ref['sentences']) for ref in refs])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).tolist()
        self.is_weak = torch.tensor([is_weak_sentence(sent['raw'], refer.Cats[category_id_of(ref)])
                                     for ref in refs for sent in ref['sentences']], dtype=torch.bool)  # [N]

        # the reference picks the occluded refs once, at construction, and only for the train split
        self.boxed_ref_ids = frozenset()
        if random_boxes and split == 'train':
            n_boxed = int(len(self.ref_ids) * BOXED_FRACTION)
            self.boxed_ref_ids = frozenset(random.Random(seed).sample(self.ref_ids, n_boxed))
        self.seed, self.epoch = int(seed), 0

    def __len__(self):
        return len(self.ref_ids)

    def set_epoch(self, epoch):
        """Fresh draws each epoch; loader workers are started per epoch, so they see it."""
        self.epoch = int(epoch)

    def item_generator(self, index):
        """The generator of item `index`'s draws in this epoch: a function of (seed, epoch, index) only."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def sentence_rows(self, index):
        return range(self.offsets[index], self.offsets[index + 1])

    def load_image(self, ref):
        path = self.refer.image_path(ref)
        try:
            return open_rgb(path)  # 8-bit RGB from any mode (refer.images)
        except FileNotFoundError:
            raise InputError(f"image file '{path}' of ref {ref['ref_id']} not found") from None
        except (OSError, ValueError) as e:
            raise InputError(f"image file '{path}' of ref {ref['ref_id']} cannot be read ({e})") from None

    def __getitem__(self, index):
        ref_id = self.ref_ids[index]
        ref = self.refer.Refs[ref_id]
        draws = None if self.eval_mode else self.item_generator(index)
        image = self.load_image(ref)  # freshly decoded: the boxes may go on it in place
        if ref_id in self.boxed_ref_ids:  # before resizing, as the reference
            image = add_random_boxes(image, size=occlusion_box_size(*image.size), generator=draws, inplace=True)
        target = self.refer.getMask(ref)['mask']  # uint8 [H, W] in {0, 1}
        if not getattr(self.transform, 'accepts_arrays', False):
            target = Image.fromarray(target)
        image, target = self.transform(image, target)  # [3, S, S] float32, [S, S] int64 (or both uint8)

        rows = self.sentence_rows(index)
        if self.eval_mode:
            rows = slice(rows.start, rows.stop)
            input_ids, attention_mask = self.input_ids[rows], self.attention_mask[rows]  # [K, T]
            is_weak = self.is_weak[rows]  # [K]
        else:
            row = rows[int(torch.randint(len(rows), (1,), generator=draws))]
            input_ids, attention_mask = self.input_ids[row], self.attention_mask[row]  # [T]
            is_weak = bool(self.is_weak[row])
        return {'image': image, 'target': target, 'input_ids': input_ids.clone(),
                'attention_mask': attention_mask.clone(), 'ref_id': ref_id, 'index': index,
                'is_weak': is_weak}


def build_dataset(args, split, tokenizer, eval_mode, refer=None, uint8_items=False):
    """ReferDataset from the shared command-line args; pass `refer` to reuse one REFER index.
    Its data are checked up front on min(--workers, CPUs per local process) processes (--workers auto: all)."""
    if refer is None:
        refer = REFER(args.refer_data_root, args.dataset, args.splitBy)
    cpus = cpus_per_local_process()
    workers = getattr(args, 'workers', 0)
    check_workers = cpus if workers == 'auto' else min(workers, cpus)
    return ReferDataset(refer, split, tokenizer, args.img_size, eval_mode=eval_mode,
                        random_boxes=getattr(args, 'random_boxes', True) and not eval_mode,
                         seed=getattr(args, 'seed', 0), check_workers=check_workers, uint8_items=uint8_items)
