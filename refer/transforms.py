"""Joint image / mask transforms (as the reference: resize to S x S, to tensor, ImageNet normalize)
and the random-boxes augmentation.

`build_transform` returns `ResizeToTensorNormalize`: one step whose tensors are bit-identical to the
reference's three steps, `Compose([Resize(S, S), ToTensor(), Normalize()])` (kept below), but with fewer
copies. tests/test_loader_speed_equivalence.py checks this against a frozen copy of the old transform.
  image  Pillow's bilinear resize as before. Torch's uint8 antialiased resize is faster but differs
         from Pillow's by 1-2 levels on some pixels at some sizes, so it is not used. After the
         resize: one uint8 HWC -> float CHW copy, then in-place / 255, - mean, / std. These are the
         float32 operations of to_tensor + normalize, without their uint8 permute copy, float
         temporary and clone.
  mask   a uint8 array from the rasterizer (C or Fortran order) is resized by row/column indexing
         with the indices that Pillow's NEAREST resize picks (read from Pillow itself, once per size),
         not array -> PIL image -> resize -> array. A PIL mask goes the reference's way.

`build_transform(S, uint8=True)` (the train loader's): the same resize, but the item leaves the loader worker
as uint8 (image [3, S, S], mask [S, S]), a fifth of the bytes to hand over, and `finish_batch` on the
training device makes the float32 image and int64 mask with the same float32 operations: bit for bit the
tensors of the float path (tests/test_loader_speed_equivalence.py).
"""
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class Resize:
    """Image bilinear, mask nearest, both to (h, w)."""

    def __init__(self, h, w):
        self.size = (h, w)

    def __call__(self, image, target):
        image = F.resize(image, self.size, interpolation=InterpolationMode.BILINEAR)
        target = F.resize(target, self.size, interpolation=InterpolationMode.NEAREST)
        return image, target


class ToTensor:
    """Image -> float32 [3, H, W] in [0, 1]; mask -> int64 [H, W]."""

    def __call__(self, image, target):
        return F.to_tensor(image), torch.as_tensor(np.array(target), dtype=torch.int64)


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, target):
        return F.normalize(image, mean=self.mean, std=self.std), target


@lru_cache(maxsize=64)
def nearest_indices(in_size, out_size):
    """int64 [out_size]: the source index of each output position when Pillow's NEAREST resize maps
    `in_size` to `out_size`. Read from Pillow itself by resizing a 1-row image that holds 1..in_size.
    Pillow tabulates x and y positions separately (ImagingScaleAffine), so a row of indices and a column
    of indices give the whole 2-D mapping."""
    ramp = Image.fromarray(np.arange(1, in_size + 1, dtype=np.int32)[None, :], 'I')
    picked = np.asarray(ramp.resize((out_size, 1), Image.NEAREST), dtype=np.int64)[0] - 1
    if picked.min() < 0:  # Pillow filled a position instead of sampling it (not expected for a whole image)
        raise ValueError(f'no nearest-neighbour index map from {in_size} to {out_size} pixels')
    picked.flags.writeable = False  # shared by every call
    return picked


def resize_mask_nearest(mask, h, w, dtype=np.int64):
    """uint8 array [H, W] -> tensor [h, w] of `dtype`, equal to torch.as_tensor(np.array(PIL NEAREST resize))."""
    rows, cols = nearest_indices(mask.shape[0], h), nearest_indices(mask.shape[1], w)
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:  # pycocotools' masks: gather whole columns first
        picked = mask[:, cols][rows]
    else:
        picked = mask[rows][:, cols]
    return torch.from_numpy(picked.astype(dtype))


class ResizeToTensorNormalize:
    """Resize(h, w) + ToTensor() + Normalize(), bit-identical, in one step (see the module docstring).
    The image is a PIL image: RGB takes the fast path, other modes the reference's. The target is a PIL
    image or a uint8 array [H, W] (`accepts_arrays`: the dataset passes the rasterized mask as it is).
    uint8=True: resized only, both as uint8 (an RGB image); `finish_batch` does the rest."""

    accepts_arrays = True

    def __init__(self, h, w, mean=IMAGENET_MEAN, std=IMAGENET_STD, uint8=False):
        self.size = (h, w)
        if uint8 and (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD):
            raise ValueError('uint8 items are normalized by finish_batch with ImageNet mean and std only')
        self.uint8 = uint8
        self.mean_std = list(mean), list(std)
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)  # as F.normalize builds them
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def image_tensor(self, image):
        """PIL image -> float [C, h, w], resized and normalized (uint8 [3, h, w], resized, with uint8=True)."""
        resized = F.resize(image, self.size, interpolation=InterpolationMode.BILINEAR)
        return channels_first_uint8(resized) if self.uint8 else self.normalized(resized)

    def normalized(self, image):
        """PIL image (resized) -> float [C, H, W]: F.normalize(F.to_tensor(image)), bit for bit."""
        if image.mode != 'RGB' or torch.get_default_dtype() != torch.float32:
            return F.normalize(F.to_tensor(image), *self.mean_std)  # the reference's two steps
        pixels = np.asarray(image)  # uint8 [h, w, 3], a read-only view of Pillow's bytes
        out = torch.empty(pixels.shape[2], pixels.shape[0], pixels.shape[1], dtype=torch.float32)
        # allocated by torch, not numpy: in a loader worker a numpy-allocated output cost ~1,100 more
        # page faults per item (measured on 800-px JPEGs at 480 px; see docs/benchmarks.md)
        np.copyto(out.numpy(), pixels.transpose(2, 0, 1))  # the one copy: uint8 HWC -> float32 CHW (exact)
        return out.div_(255).sub_(self.mean).div_(self.std)  # to_tensor's / 255, then normalize's ops

    def target_tensor(self, target):
        """PIL image or uint8 array [H, W] -> int64 [h, w], nearest."""
        dtype = np.uint8 if self.uint8 else np.int64
        if isinstance(target, np.ndarray) and target.ndim == 2 and target.dtype == np.uint8:
            return resize_mask_nearest(target, *self.size, dtype=dtype)
        if isinstance(target, np.ndarray):
            target = Image.fromarray(target)
        target = F.resize(target, self.size, interpolation=InterpolationMode.NEAREST)
        return torch.as_tensor(np.array(target).astype(dtype))

    def __call__(self, image, target):
        return self.image_tensor(image), self.target_tensor(target)


def build_transform(img_size, uint8=False):
    return ResizeToTensorNormalize(img_size, img_size, uint8=uint8)


def channels_first_uint8(image):
    """PIL RGB image -> uint8 [3, H, W] (one copy, into torch's allocator as in `normalized`)."""
    if image.mode != 'RGB':
        raise ValueError(f'uint8 items need an RGB image, got mode {image.mode}')
    pixels = np.asarray(image)
    out = torch.empty(3, pixels.shape[0], pixels.shape[1], dtype=torch.uint8)
    np.copyto(out.numpy(), pixels.transpose(2, 0, 1))
    return out


@lru_cache(maxsize=16)
def _mean_std(device):
    """ImageNet mean and std [1, 3, 1, 1] float32 on `device`, built once (no host copy per batch)."""
    return tuple(torch.as_tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1).to(device)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def finish_batch(batch):
    """A collated batch whose 'image' / 'target' came as uint8 (`build_transform(S, uint8=True)`), on any
    device -> float32 normalized images and int64 masks, bit for bit those of the float path (the same
    float32 operations: exact conversion, / 255, - mean, / std, each IEEE-rounded). Other batches as they are."""
    image, target = batch.get('image'), batch.get('target')
    if torch.is_tensor(image) and image.dtype == torch.uint8:
        mean, std = _mean_std(image.device)
        batch['image'] = image.to(torch.float32).div_(255).sub_(mean).div_(std)
    if torch.is_tensor(target) and target.dtype == torch.uint8:
        batch['target'] = target.long()
    return batch


def add_random_boxes(image, min_num=20, max_num=60, size=32, generator=None, inplace=False):
    """Black out `min_num..max_num` random `size` x `size` boxes of a PIL RGB image (the reference's
    occlusion augmentation, applied at the original resolution). Randomness comes from torch
    (`generator` or the global one) so DataLoader worker seeding makes it reproducible. A copy unless
    `inplace` (the dataset's freshly decoded image). Boxes are filled by Pillow (clipped at the
    borders, as numpy slicing clips them), with no round trip through numpy."""
    w, h = image.size
    num = int(torch.randint(min_num, max_num + 1, (1,), generator=generator))
    ys = torch.randint(0, max(h - size, 0) + 1, (num,), generator=generator).tolist()
    xs = torch.randint(0, max(w - size, 0) + 1, (num,), generator=generator).tolist()
    if not inplace:
        image = image.copy()
    black = 0 if len(image.getbands()) == 1 else (0,) * len(image.getbands())
    for y, x in zip(ys, xs):
        image.paste(black, (x, y, x + size, y + size))
    return image
