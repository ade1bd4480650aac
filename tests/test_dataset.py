"""ReferDataset on the generated demo data: tensors in train and eval mode, weak flags, token ids as
the reference builds them, the random-boxes augmentation, and errors for missing images."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bert.encoder import load_tokenizer
from refer.dataset import ReferDataset, build_dataset, occlusion_box_size, tokenize_sentences
from refer.refer import REFER, load_refs
from refer.transforms import add_random_boxes
from utils import InputError, get_parser

S = 32


@pytest.fixture(scope='module')
def tokenizer(small_bert_dir):
    return load_tokenizer(small_bert_dir)


@pytest.fixture(scope='module')
def refer(demo_root):
    return REFER(str(demo_root), 'rrsisd', 'unc')


def copy_root_with_refs(demo_root, dst, edit):
    """A data root sharing the demo's images and instances, with refs changed by `edit(refs)`."""
    (dst / 'rrsisd').mkdir(parents=True)
    shutil.copy(demo_root / 'rrsisd' / 'instances.json', dst / 'rrsisd' / 'instances.json')
    (dst / 'images').symlink_to(demo_root / 'images')
    refs = load_refs(str(demo_root / 'rrsisd' / 'refs(unc).p'))
    edit(refs)
    with open(dst / 'rrsisd' / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f)
    return dst


def test_train_item(refer, tokenizer):
    ds = ReferDataset(refer, 'train', tokenizer, S)
    assert len(ds) == len(refer.getRefIds(split='train'))
    item = ds[3]
    assert item['image'].shape == (3, S, S) and item['image'].dtype == torch.float32
    assert item['target'].shape == (S, S) and item['target'].dtype == torch.int64
    assert set(item['target'].unique().tolist()) <= {0, 1} and item['target'].sum() > 0
    assert item['input_ids'].shape == item['attention_mask'].shape == (20,)
    assert item['input_ids'].dtype == item['attention_mask'].dtype == torch.int64
    assert item['ref_id'] == ds.ref_ids[3] and item['index'] == 3
    assert item['is_weak'] is False
    n = int(item['attention_mask'].sum())
    assert item['input_ids'][0] == tokenizer.cls_token_id and item['input_ids'][n - 1] == tokenizer.sep_token_id
    assert (item['input_ids'][n:] == 0).all() and (item['attention_mask'][:n] == 1).all()
    # ImageNet normalization: values leave [0, 1]
    assert item['image'].min() < 0


def test_eval_item_and_loader(refer, tokenizer):
    ds = ReferDataset(refer, 'test', tokenizer, S, eval_mode=True)
    assert not ds.boxed_ref_ids  # occlusion is for the train split only
    batch = next(iter(DataLoader(ds, batch_size=1)))
    assert batch['image'].shape == (1, 3, S, S) and batch['target'].shape == (1, S, S)
    assert batch['input_ids'].shape == batch['attention_mask'].shape == (1, 1, 20)
    assert batch['is_weak'].shape == (1, 1) and batch['is_weak'].dtype == torch.bool


def test_train_loader_collates(refer, tokenizer):
    ds = ReferDataset(refer, 'train', tokenizer, S)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch['image'].shape == (4, 3, S, S) and batch['input_ids'].shape == (4, 20)
    assert batch['is_weak'].dtype == torch.bool and batch['ref_id'].tolist() == ds.ref_ids[:4]


def test_weak_flags_and_several_sentences(demo_root, tmp_path, tokenizer):
    names = {c['id']: c['name'] for c in REFER(str(demo_root)).data['categories']}

    def edit(refs):
        train = [r for r in refs if r['split'] == 'train']
        for ref in train[:3]:  # weak: expression replaced by the class name (as mask_train_only.py)
            ref['sentences'][0]['raw'] = names[ref['category_id']]
        val = [r for r in refs if r['split'] == 'val'][0]
        val['sentences'].append({'raw': f"  {names[val['category_id']].upper()} ", 'sent': 'x', 'tokens': ['x'],
                                 'sent_id': 10_000})
        val['sent_ids'].append(10_000)

    root = copy_root_with_refs(demo_root, tmp_path / 'root', edit)
    refer = REFER(str(root))
    train = ReferDataset(refer, 'train', tokenizer, S)
    assert [train[i]['is_weak'] for i in range(5)] == [True, True, True, False, False]
    val = ReferDataset(refer, 'val', tokenizer, S, eval_mode=True)
    item = val[0]
    assert item['input_ids'].shape == item['attention_mask'].shape == (2, 20)
    assert item['is_weak'].tolist() == [False, True]
    # train mode picks one of the sentences at random: a fresh draw each epoch, the same within one
    val_train = ReferDataset(refer, 'val', tokenizer, S)
    picked = set()
    for epoch in range(20):
        val_train.set_epoch(epoch)
        picked.add(tuple(val_train[0]['input_ids'].tolist()))
        assert torch.equal(val_train[0]['input_ids'], val_train[0]['input_ids'])
    assert picked == {tuple(row) for row in item['input_ids'].tolist()}


def test_token_ids_match_reference_truncation(tokenizer):
    long = ' '.join(['the large gray storage tank on the upper left'] * 4)
    sentences = ['A vehicle on the left', long, 'vehicle']
    input_ids, attention_mask = tokenize_sentences(tokenizer, sentences, max_tokens=20)
    for row, mask, sentence in zip(input_ids.tolist(), attention_mask.tolist(), sentences):
        ids = tokenizer.encode(sentence, add_special_tokens=True)[:20]  # the reference's recipe
        assert row == ids + [0] * (20 - len(ids))
        assert mask == [1] * len(ids) + [0] * (20 - len(ids))
    assert input_ids[1, -1] != tokenizer.sep_token_id  # truncation cuts [SEP], as the reference


def test_random_boxes_fixed_fraction_and_seeded(refer, tokenizer):
    a = ReferDataset(refer, 'train', tokenizer, S, seed=1)
    b = ReferDataset(refer, 'train', tokenizer, S, seed=1)
    c = ReferDataset(refer, 'train', tokenizer, S, seed=2)
    assert len(a.boxed_ref_ids) == int(0.2 * len(a)) > 0
    assert a.boxed_ref_ids == b.boxed_ref_ids != c.boxed_ref_ids
    assert not ReferDataset(refer, 'train', tokenizer, S, random_boxes=False).boxed_ref_ids
    # a boxed ref's image is occluded, an unboxed one is not
    off = ReferDataset(refer, 'train', tokenizer, S, random_boxes=False)
    boxed = next(i for i, r in enumerate(a.ref_ids) if r in a.boxed_ref_ids)
    clean = next(i for i, r in enumerate(a.ref_ids) if r not in a.boxed_ref_ids)
    assert not torch.equal(a[boxed]['image'], off[boxed]['image'])
    assert torch.equal(a[clean]['image'], off[clean]['image'])
    assert torch.equal(a[boxed]['target'], off[boxed]['target'])


def test_occlusion_box_size():
    assert occlusion_box_size(800, 800) == occlusion_box_size(1024, 900) == 32  # the reference's boxes
    assert occlusion_box_size(128, 128) == 5


def test_add_random_boxes_blacks_out_32px_boxes():
    image = Image.new('RGB', (200, 150), (255, 255, 255))
    out = np.array(add_random_boxes(image, generator=torch.Generator().manual_seed(0)))
    black = (out == 0).all(-1)
    assert out.shape == (150, 200, 3) and black.sum() >= 32 * 32
    assert np.array(image).min() == 255  # the input is left alone
    # every black pixel belongs to some fully black 32 x 32 square
    ys, xs = np.nonzero(black)
    y, x = ys[0], xs[0]
    assert black[y:y + 32, x:x + 32].all()


def test_missing_image_names_file_and_ref(demo_root, tmp_path, tokenizer):
    root = tmp_path / 'root'
    shutil.copytree(demo_root, root)
    refer = REFER(str(root))
    ref_id = refer.getRefIds(split='val')[1]
    path = refer.image_path(refer.Refs[ref_id])
    os.remove(path)
    with pytest.raises(InputError, match=rf"{os.path.basename(path)}' of ref {ref_id} not found"):
        ReferDataset(refer, 'val', tokenizer, S, eval_mode=True)
    ds = ReferDataset(refer, 'val', tokenizer, S, eval_mode=True, check_images=False)
    with pytest.raises(InputError, match=rf'of ref {ref_id} not found'):
        ds[1]


def test_empty_split_and_bad_size(refer, tokenizer):
    with pytest.raises(InputError, match="split 'testB'"):
        ReferDataset(refer, 'testB', tokenizer, S)
    with pytest.raises(InputError, match='img_size'):
        ReferDataset(refer, 'train', tokenizer, 0)


def test_build_dataset_from_args(demo_root, small_bert_dir, tokenizer):
    args = get_parser().parse_args(['--refer_data_root', str(demo_root), '--img_size', str(S),
                                    '--bert_tokenizer', str(small_bert_dir), '--no-random_boxes'])
    train = build_dataset(args, 'train', tokenizer, eval_mode=False)
    val = build_dataset(args, 'val', tokenizer, eval_mode=True, refer=train.refer)
    assert not train.boxed_ref_ids and val.refer is train.refer
    assert train[0]['image'].shape == (3, S, S) and val[0]['input_ids'].dim() == 2


def test_draws_depend_on_seed_epoch_and_index_only(refer, tokenizer):
    """Not on the global RNG of the process or worker that makes the item."""
    ds = ReferDataset(refer, 'train', tokenizer, S, seed=1)
    boxed = next(i for i, r in enumerate(ds.ref_ids) if r in ds.boxed_ref_ids)
    torch.manual_seed(0)
    first = ds[boxed]
    torch.manual_seed(123)
    torch.rand(7)
    again = ds[boxed]
    assert torch.equal(first['image'], again['image']) and torch.equal(first['input_ids'], again['input_ids'])
    ds.set_epoch(1)
    assert not torch.equal(ds[boxed]['image'], first['image'])  # new box positions in a new epoch
    other_seed = ReferDataset(refer, 'train', tokenizer, S, seed=2)
    other_seed.boxed_ref_ids = ds.boxed_ref_ids
    assert not torch.equal(other_seed[boxed]['image'], first['image'])


def test_loader_batches_do_not_depend_on_the_worker_count(refer, tokenizer):
    """The same epoch's batches from the main process and from 1 and 2 worker processes, bit for bit."""
    from lib.training.data import build_train_loader

    def epoch_batches(workers, epoch):
        ds = ReferDataset(refer, 'train', tokenizer, S, seed=4, uint8_items=True, check_images=False)
        loader = build_train_loader(ds, 2, workers, seed=4)
        loader.sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        torch.manual_seed(workers)  # a different global state (and worker base seed) for each
        return list(loader)
    for epoch in (0, 1):
        runs = [epoch_batches(w, epoch) for w in (0, 1, 2)]
        assert len({len(r) for r in runs}) == 1 and len(runs[0]) > 1
        for batches in zip(*runs):
            for b in batches[1:]:
                for key in ('image', 'target', 'input_ids', 'attention_mask', 'ref_id', 'is_weak'):
                    assert torch.equal(b[key], batches[0][key]), (epoch, key)
