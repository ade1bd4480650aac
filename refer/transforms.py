"""Joint image / mask transforms (as the reference: resize to S x S, to tensor, ImageNet normalize)
and the random-boxes augmentation."""
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


def build_transform(img_size):
    return Compose([Resize(img_size, img_size), ToTensor(), Normalize()])


def add_random_boxes(image, min_num=20, max_num=60, size=32, generator=None):
    """Black out `min_num..max_num` random `size` x `size` boxes of a PIL RGB image (the reference's
    occlusion augmentation, applied at the original resolution). Randomness comes from torch
    (`generator` or the global one) so DataLoader worker seeding makes it reproducible."""
    pixels = np.array(image)  # [H, W, 3], a copy
    h, w = pixels.shape[:2]
    num = int(torch.randint(min_num, max_num + 1, (1,), generator=generator))
    ys = torch.randint(0, max(h - size, 0) + 1, (num,), generator=generator).tolist()
    xs = torch.randint(0, max(w - size, 0) + 1, (num,), generator=generator).tolist()
    for y, x in zip(ys, xs):
        pixels[y:y + size, x:x + size] = 0
    return Image.fromarray(pixels)
