"""The faster train / eval transform (refer.transforms.ResizeToTensorNormalize, array masks, random boxes
filled by Pillow) gives tensors bit-identical to the transform it replaced. A frozen copy of the old one
is kept here as the reference: Compose([Resize, ToTensor, Normalize]) on PIL image + PIL mask, and
add_random_boxes through numpy. Images of several modes and sizes, 800-px JPEGs like RRSIS-D's,
upscaling and downscaling, masks in C and Fortran order, whole dataset items with and without boxes.
The uint8 hand-over (items as uint8, finished on the device by `finish_batch`) gives the same tensors too,
item by item and through the train loader's worker processes."""
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from refer.dataset import ReferDataset, occlusion_box_size
from refer.images import open_rgb, to_rgb
from refer.refer import REFER
from refer.transforms import (ResizeToTensorNormalize, add_random_boxes, build_transform, finish_batch,
                              nearest_indices, resize_mask_nearest)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --- the old transform, frozen ------------------------------------------------------------------

def old_transform(size):
    def apply(image, target):
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR)
        target = F.resize(target, size, interpolation=InterpolationMode.NEAREST)
        image, target = F.to_tensor(image), torch.as_tensor(np.array(target), dtype=torch.int64)
        return F.normalize(image, mean=MEAN, std=STD), target
    return apply


def old_add_random_boxes(image, min_num=20, max_num=60, size=32, generator=None):
    pixels = np.array(image)
    h, w = pixels.shape[:2]
    num = int(torch.randint(min_num, max_num + 1, (1,), generator=generator))
    ys = torch.randint(0, max(h - size, 0) + 1, (num,), generator=generator).tolist()
    xs = torch.randint(0, max(w - size, 0) + 1, (num,), generator=generator).tolist()
    for y, x in zip(ys, xs):
        pixels[y:y + size, x:x + size] = 0
    return Image.fromarray(pixels)


def old_item_tensors(refer, ref, img_size, boxed, generator=None):
    image = open_rgb(refer.image_path(ref))
    if boxed:
        image = old_add_random_boxes(image, size=occlusion_box_size(*image.size), generator=generator)
    target = Image.fromarray(refer.getMask(ref)['mask'])
    return old_transform((img_size, img_size))(image, target)


# --- test images -------------------------------------------------------------------------------

def textured(h, w, seed):
    """Overhead-looking content: smooth fields, sharp-edged blocks, fine noise (uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, h), np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    field = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
             + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    img = field * 180 + rng.normal(0, 12, (h, w, 3))
    for _ in range(12):
        y, x = rng.integers(0, h), rng.integers(0, w)
        img[y:y + rng.integers(2, h // 4 + 3), x:x + rng.integers(2, w // 4 + 3)] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def polygon_mask(h, w, seed):
    """pycocotools' rasterization of a random polygon: uint8 [h, w] in Fortran order, as getMask gives."""
    rng = np.random.default_rng(seed)
    cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(h, w) * rng.uniform(0.1, 0.45)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = r * rng.uniform(0.5, 1.0, 9)
    poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).reshape(-1).tolist()
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(np.uint8)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """PIL images of several modes and sizes, as the dataset decodes them (open_rgb) and as they are."""
    d = tmp_path_factory.mktemp('images')
    out = {}
    for i, (h, w) in enumerate([(800, 800), (800, 800), (601, 397), (333, 1024), (64, 64), (31, 17)]):
        path = d / f'rgb{i}.jpg'
        Image.fromarray(textured(h, w, i)).save(path, quality=95)
        out[f'jpeg{h}x{w}_{i}'] = open_rgb(path)
    rgb = textured(200, 300, 7)
    Image.fromarray(rgb[..., 0]).save(d / 'grey.jpg', quality=95)
    Image.fromarray(rgb).convert('CMYK').save(d / 'cmyk.jpg', quality=95)
    Image.fromarray(rgb).convert('P', palette=Image.ADAPTIVE).save(d / 'palette.png')
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / 'rgba.png')
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257 + 3).astype(np.uint16)).save(d / 'grey16.png')
    for name in ('grey.jpg', 'cmyk.jpg', 'palette.png', 'rgba.png', 'grey16.png'):
        out[name] = open_rgb(d / name)
    return out


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(480, 480), (64, 64), (48, 40), (900, 820)])
def test_transform_is_bit_identical(images, size):
    new = ResizeToTensorNormalize(*size)
    old = old_transform(size)
    for i, (name, image) in enumerate(images.items()):
        h, w = image.size[1], image.size[0]
        mask = polygon_mask(h, w, i)
        ref_image, ref_target = old(image, Image.fromarray(mask))
        for target in (mask, np.ascontiguousarray(mask), Image.fromarray(mask)):  # Fortran, C, PIL
            got_image, got_target = new(image, target)
            assert got_image.dtype == ref_image.dtype and got_target.dtype == ref_target.dtype, name
            assert torch.equal(got_image, ref_image), (name, size)
            assert torch.equal(got_target, ref_target), (name, size)
        assert got_image.is_contiguous() and got_target.is_contiguous()


def outcome(transform, image, target):
    try:
        return transform(image, target)
    except Exception as e:  # noqa: BLE001 - the old transform's errors are part of what is compared
        return type(e), str(e)


def test_other_modes_take_the_reference_path():
    """Images that are not RGB (grey, 16-bit, RGBA) given straight to the transform, as a user might: the
    same tensors, or the same error (ImageNet's 3 means do not fit a 1-channel image)."""
    rgb = textured(90, 70, 3)
    grey16 = Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)
    for image in (Image.fromarray(rgb[..., 0]), Image.fromarray(np.dstack([rgb, rgb[..., :1]])), grey16,
                  to_rgb(grey16), Image.fromarray(rgb).convert('YCbCr')):
        target = Image.new('L', image.size)  # lib.inference's dummy mask
        got, ref = outcome(build_transform(32), image, target), outcome(old_transform((32, 32)), image, target)
        if isinstance(ref[0], torch.Tensor):
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), image.mode
        else:
            assert got == ref, image.mode


def test_nearest_indices_match_pillow():
    rng = np.random.default_rng(0)
    for h, w in [(800, 800), (601, 397), (31, 17), (1, 5), (480, 480), (1024, 333)]:
        mask = (rng.random((h, w)) < 0.5).astype(np.uint8)
        for out_h, out_w in [(480, 480), (64, 64), (1, 1), (1000, 7), (h, w)]:
            ref = np.array(Image.fromarray(mask).resize((out_w, out_h), Image.NEAREST))
            assert np.array_equal(resize_mask_nearest(mask, out_h, out_w).numpy(), ref), (h, w, out_h, out_w)
            assert np.array_equal(resize_mask_nearest(np.asfortranarray(mask), out_h, out_w).numpy(), ref)
    assert not nearest_indices(800, 480).flags.writeable  # cached: nobody may change it


@pytest.mark.parametrize('image_size, box', [((800, 800), 32), ((200, 150), 32), ((17, 31), 32), ((64, 64), 3)])
def test_random_boxes_are_identical(image_size, box):
    image = Image.fromarray(textured(image_size[1], image_size[0], 5))
    before = np.array(image)
    for seed in range(5):
        ref = old_add_random_boxes(image, size=box, generator=torch.Generator().manual_seed(seed))
        got = add_random_boxes(image, size=box, generator=torch.Generator().manual_seed(seed))
        assert got.mode == ref.mode == 'RGB' and np.array_equal(np.array(got), np.array(ref))
        assert np.array_equal(np.array(image), before)  # a copy unless asked
        inplace = image.copy()
        same = add_random_boxes(inplace, size=box, generator=torch.Generator().manual_seed(seed), inplace=True)
        assert same is inplace and np.array_equal(np.array(same), np.array(ref))
    # the global RNG is consumed as before (the sentence pick that follows in __getitem__ sees the same state)
    torch.manual_seed(1)
    old_add_random_boxes(image, size=box)
    after_old = torch.rand(1)
    torch.manual_seed(1)
    add_random_boxes(image, size=box)
    assert torch.equal(torch.rand(1), after_old)


@pytest.fixture(scope='module')
def refer_800(tmp_path_factory):
    from refer.demo_data import generate
    root = tmp_path_factory.mktemp('demo800') / 'data'
    generate(root, images=8, size=800, seed=1)
    return REFER(str(root), 'rrsisd', 'unc')


class Tokens:
    """A stand-in tokenizer: the images and masks are under test, not the ids."""
    backend_tokenizer = None

    def __call__(self, sentences, **kwargs):
        return {'input_ids': [[101, 7, 102]] * len(sentences)}


@pytest.mark.parametrize('img_size', [480, 64])
def test_dataset_items_are_identical(refer_800, img_size):
    for split, eval_mode in (('train', False), ('test', True)):
        ds = ReferDataset(refer_800, split, Tokens(), img_size, eval_mode=eval_mode, check_images=False)
        boxed = set(ds.ref_ids[::2]) if split == 'train' else set()
        ds.boxed_ref_ids = frozenset(boxed)  # half the refs boxed, half not
        for index, ref_id in enumerate(ds.ref_ids):
            item = ds[index]
            ref_image, ref_target = old_item_tensors(refer_800, refer_800.Refs[ref_id], img_size, ref_id in boxed,
                                                     ds.item_generator(index))  # the item's own draws
            assert torch.equal(item['image'], ref_image), (split, ref_id)
            assert torch.equal(item['target'], ref_target), (split, ref_id)


def test_a_custom_transform_still_gets_pil_masks(refer_800):
    seen = []

    def transform(image, target):
        seen.append(type(target))
        return old_transform((32, 32))(image, target)
    ds = ReferDataset(refer_800, 'train', Tokens(), 32, transform=transform, check_images=False)
    ds[0]
    assert len(seen) == 1 and issubclass(seen[0], Image.Image)


@pytest.mark.parametrize('size', [(480, 480), (64, 64), (48, 40)])
def test_uint8_items_finish_to_the_float_tensors(images, size):
    """Two items collated as uint8 and finished as a batch equal the reference's float items, bit for bit."""
    old, new = old_transform(size), ResizeToTensorNormalize(*size, uint8=True)
    rgb = [image for image in images.values() if image.mode == 'RGB']
    for a, b in zip(rgb, rgb[1:]):
        masks = [polygon_mask(x.size[1], x.size[0], i) for i, x in enumerate((a, b))]
        items = [new(x, m) for x, m in zip((a, b), masks)]
        assert all(img.dtype == torch.uint8 and t.dtype == torch.uint8 for img, t in items)
        batch = finish_batch({'image': torch.stack([i for i, _ in items]), 'target': torch.stack([t for _, t in items])})
        refs = [old(x, Image.fromarray(m)) for x, m in zip((a, b), masks)]
        assert batch['image'].dtype == torch.float32 and batch['target'].dtype == torch.int64
        assert torch.equal(batch['image'], torch.stack([i for i, _ in refs])), size
        assert torch.equal(batch['target'], torch.stack([t for _, t in refs])), size


def test_uint8_train_loader_gives_the_float_loaders_batches(refer_800):
    """The train loader as training builds it (2 worker processes, seeded sampler, random boxes on): uint8
    batches finished by the engine's to_device are the float dataset's batches, draw for draw."""
    from lib.training.data import build_train_loader
    from lib.training.engine import to_device

    def batches(uint8_items):
        ds = ReferDataset(refer_800, 'train', Tokens(), 64, check_images=False, uint8_items=uint8_items)
        ds.boxed_ref_ids = frozenset(ds.ref_ids[::2])
        torch.manual_seed(3)  # the workers' base seed
        loader = build_train_loader(ds, 2, workers=2, seed=5)
        return [to_device(b, torch.device('cpu')) for b in loader]
    floats, uint8s = batches(False), batches(True)
    assert len(floats) == len(uint8s) > 0
    for f, u in zip(floats, uint8s):
        assert u['image'].dtype == torch.float32 and u['target'].dtype == torch.int64
        assert torch.equal(f['image'], u['image']) and torch.equal(f['target'], u['target'])
        assert torch.equal(f['input_ids'], u['input_ids']) and f['ref_id'].tolist() == u['ref_id'].tolist()


def test_uint8_items_refuse_another_normalization():
    """finish_batch normalizes with ImageNet's mean and std: a uint8 transform with others would be wrong."""
    with pytest.raises(ValueError, match='ImageNet mean and std only'):
        ResizeToTensorNormalize(32, 32, mean=(0.5, 0.5, 0.5), uint8=True)
    ResizeToTensorNormalize(32, 32, mean=(0.5, 0.5, 0.5))  # the float path normalizes itself


def test_finish_batch_leaves_float_batches_alone():
    image, target = torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.int64)
    batch = finish_batch({'image': image, 'target': target, 'ref_id': [1, 2]})
    assert batch['image'] is image and batch['target'] is target
