"""Pictures of predictions: PNG panels (image | ground truth | prediction, with the expression) that
test.py --vis_dir writes through `OverlayWriter`, and the de-normalisation they share."""
import os
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from lib.files import atomic_file
from refer.transforms import IMAGENET_MEAN, IMAGENET_STD


def to_rgb(image):
    """A normalized image tensor [3, H, W] -> uint8 array [H, W, 3] (the inverse of refer.transforms'
    normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def tint(rgb, mask, color):
    """`rgb` [H, W, 3] with the pixels of `mask` [H, W] (tensor or array, None: none) half-blended
    with `color`."""
    out = rgb.astype(np.float32)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        out[m] = 0.5 * out[m] + 0.5 * np.array(color, dtype=np.float32)
    return out.astype(np.uint8)


class OverlayWriter:
    """`on_prediction` hook of `evaluate`: PNG panels (image | ground truth | prediction + expression)
    for the first `num` dataset items. Each rank writes the items it evaluated."""

    def __init__(self, out_dir, num, tokenizer=None):
        self.out_dir, self.num, self.tokenizer = out_dir, num, tokenizer
        os.makedirs(out_dir, exist_ok=True)
        self.written = []

    def expression(self, ids, mask):
        ids = ids[mask.bool()].tolist()
        if self.tokenizer is None:
            return ' '.join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, batch, logits):
        index = batch.get('index', batch.get('ref_id'))
        index = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        pred = logits.argmax(1).cpu()
        for b, idx in enumerate(index):
            if idx >= self.num:
                continue
            text = self.expression(batch['input_ids'][b].cpu(), batch['attention_mask'][b].cpu())
            path = os.path.join(self.out_dir, f'{idx:05d}_s{batch.get("sentence", 0)}.png')
            save_overlay(path, batch['image'][b].cpu(), batch['target'][b].cpu(), pred[b], text)
            self.written.append(path)


def save_overlay(path, image, target, pred, text, min_side=256):
    """image [3, H, W] normalized; target/pred [H, W] in {0, 1}; writes the panel atomically."""
    rgb = to_rgb(image)  # [H, W, 3]
    h, w = rgb.shape[:2]
    scale = max(1, -(-min_side // max(h, w)))  # small inputs are enlarged (nearest) to stay readable
    h, w = h * scale, w * scale
    lines = textwrap.wrap(f'"{text}"', width=max(20, 3 * w // 7)) or ['""']
    band = 16 * (len(lines) + 1) + 4
    panel = Image.new('RGB', (3 * w, h + band), (255, 255, 255))
    for k, arr in enumerate((rgb, tint(rgb, target, (0, 255, 0)), tint(rgb, pred, (255, 0, 0)))):
        panel.paste(Image.fromarray(arr).resize((w, h), Image.NEAREST), (k * w, 0))
    draw = ImageDraw.Draw(panel)
    for k, caption in enumerate(('image', 'ground truth', 'prediction')):
        draw.text((k * w + 4, 4), caption, fill=(255, 255, 0))
    for k, line in enumerate(lines):
        draw.text((4, h + 4 + 16 * k), line, fill=(0, 0, 0))
    with atomic_file(path) as tmp:
        panel.save(tmp, format='PNG')
