"""predict.py's machinery: images opened and decoded, the model flags a checkpoint stores, the model built from
a checkpoint, the forward (`Predictor`), (image, expression) pairs in batches, masks back at each image's size,
overlays drawn, PNGs written. What an image goes through and what is written: predict.py's docstring."""
import contextlib
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import utils
from lib.files import atomic_file
from lib.model.build import build_model
from lib.training.checkpoint import args_to_dict, load_model_and_bert
from lib.training.engine import predict_fn, to_device

logger = logging.getLogger('lrb')

MAX_TOKENS = 20  # as training: refer.dataset.ReferDataset's max_tokens
MODEL_FLAGS = ('model', 'swin_type', 'img_size', 'window12', 'mha', 'cross_scale', 'ck_bert', 'bert_tokenizer')


# --- images ---------------------------------------------------------------------------------------

def open_image(path, decode=True):
    """8-bit RGB PIL image (refer.images.to_rgb: 16-bit, palette, CMYK, ... alike) with its EXIF orientation
    applied; with decode=False only (width, height) from the header (cheap). A missing or unreadable file,
    or a mode with no 8-bit RGB rendering, is a one-line InputError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from refer.images import to_rgb
    if os.path.isdir(path):
        raise utils.InputError(f'--image {path}: is a directory, not an image')
    try:
        with Image.open(path) as image:
            if not decode:
                return image.size
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise utils.InputError(f'--image {path}: file not found') from None
    except UnidentifiedImageError:
        raise utils.InputError(f'--image {path}: not an image file PIL can read') from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise utils.InputError(f'--image {path}: cannot be read ({cause})') from None



# --- model flags: command line, else checkpoint, else default --------------------------------------

def stored_model_flags(checkpoint):
    """Model flags of the checkpoint's stored args (dict or Namespace); {} when it has none."""
    stored = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if stored is None:
        return {}
    try:
        stored = args_to_dict(stored)
    except (TypeError, ValueError):
        return {}
    flags = {k: stored[k] for k in MODEL_FLAGS if stored.get(k) is not None}
    # the original infers window 12 from the Swin weights' file name at training time
    if 'window12' in str(stored.get('pretrained_swin_weights') or ''):
        flags['window12'] = True
    return flags


def resolve_model_flags(args, given, stored):
    """Fill args' model flags from the checkpoint where the command line did not set them.
    -> one line saying which value came from where."""
    groups = {'from the command line': [], 'from the checkpoint': [], 'defaults': []}
    for name in MODEL_FLAGS:
        if name in given:
            note = f' (checkpoint: {stored[name]!r})' if name in stored and stored[name] != getattr(args, name) else ''
            groups['from the command line'].append(f'{name}={getattr(args, name)!r}{note}')
        elif name in stored:
            setattr(args, name, stored[name])
            groups['from the checkpoint'].append(f'{name}={stored[name]!r}')
        else:
            groups['defaults'].append(f'{name}={getattr(args, name)!r}')
    if 'device' in given:
        groups['from the command line'].append(f'device={args.device!r}')
    else:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        groups['chosen'] = [f"device={args.device!r} ({'a GPU is' if args.device == 'cuda' else 'no GPU'} here)"]
    if not stored:
        groups['defaults'].append('(the checkpoint stores no args)')
    return 'model flags ' + '; '.join(f'{src}: {", ".join(items)}' for src, items in groups.items() if items)


# --- the forward ---------------------------------------------------------------------------------

class Predictor:
    """(images [B, 3, S, S] normalized, token ids [B, 20], mask [B, 20]) -> foreground probability and
    mask [B, S, S], through predict_fn: the forward test.py evaluates with."""

    def __init__(self, model, bert, tokenizer, img_size, device, threshold=None, amp=False):
        from refer.transforms import build_transform
        self.forward = predict_fn(model, bert, amp)
        self.tokenizer, self.device, self.threshold = tokenizer, device, threshold
        self.img_size = img_size
        self.transform = build_transform(img_size)

    def encode(self, expressions):
        """-> input_ids, attention_mask [E, 20] as training, and each expression's token count before the cut."""
        from refer.dataset import encode_batch, tokenize_sentences
        input_ids, attention_mask = tokenize_sentences(self.tokenizer, list(expressions), MAX_TOKENS)
        lengths = [len(ids) for ids in encode_batch(self.tokenizer, list(expressions))]
        return input_ids, attention_mask, lengths

    def image_tensor(self, image):
        """PIL RGB -> [3, S, S], the dataset's own transform (it transforms image and target together)."""
        from PIL import Image
        tensor, _ = self.transform(image, Image.new('L', image.size))
        return tensor

    @torch.no_grad()
    def __call__(self, images, input_ids, attention_mask):
        batch = to_device({'image': images, 'input_ids': input_ids, 'attention_mask': attention_mask},
                          self.device)
        logits = self.forward(batch).float()
        prob = logits.softmax(1)[:, 1]
        mask = logits.argmax(1).bool() if self.threshold is None else prob > self.threshold
        return prob.cpu(), mask.cpu()


def to_image_size(x, height, width):
    """[S, S] -> [height, width], nearest neighbour on pixel centres."""
    return F.interpolate(x[None, None].float(), size=(height, width), mode='nearest-exact')[0, 0]


def mask_stats(mask, prob):
    """mask bool [H, W], prob [H, W] -> area, COCO bbox [x, y, w, h] or None, mean probability or None."""
    area = int(mask.sum())
    if area == 0:
        return 0, None, None
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return area, [x0, y0, x1 - x0 + 1, y1 - y0 + 1], float(prob[mask].double().mean())


# --- drawing ---------------------------------------------------------------------------------------

def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_overlay(image, mask, text, min_side=256):
    """The image with the mask tinted red (as lib.training.visualize.save_overlay) and outlined, the expression written
    in a band below. Small images are enlarged (nearest) to stay readable. -> PIL image."""
    import textwrap

    from PIL import Image, ImageDraw
    rgb = np.asarray(image, dtype=np.float32).copy()
    m = mask.numpy().astype(bool)
    rgb[m] = 0.5 * rgb[m] + 0.5 * np.array((255, 0, 0), dtype=np.float32)
    inner = m.copy()  # outline: mask pixels with a 4-neighbour outside the mask
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    rgb[m & ~inner] = (255, 32, 32)
    h, w = m.shape
    scale = max(1, -(-min_side // max(h, w)))
    h, w = h * scale, w * scale
    picture = Image.fromarray(rgb.round().astype(np.uint8)).resize((w, h), Image.NEAREST)
    size = max(12, min(48, w // 28))
    font = _font(size)
    lines = textwrap.wrap(f'"{text}"', width=max(12, int(w / (0.55 * size)))) or ['""']
    line_h = int(size * 1.3)
    panel = Image.new('RGB', (w, h + line_h * len(lines) + size // 2), (255, 255, 255))
    panel.paste(picture, (0, 0))
    draw = ImageDraw.Draw(panel)
    for k, line in enumerate(lines):
        draw.text((size // 3, h + size // 4 + line_h * k), line, fill=(0, 0, 0), font=font)
    return panel


# --- run ---------------------------------------------------------------------------------------------

def output_stems(paths):
    """File stems, unique by construction, also on a disk blind to case: a/x.png, b/x.jpg, c/x-2.jpg ->
    x, x-2, x-2-2 (a suffix is only ever added until the name is free among all names given so far)."""
    used, stems = set(), []
    for path in paths:
        base = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or 'image'
        stem, n = base, 1
        while stem.casefold() in used:
            n += 1
            stem = f'{base}-{n}'
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def pair_batches(predictor, paths, num_expressions, batch_size):
    """(image index, expression index, PIL image, image tensor) in batches of `batch_size` pairs, image-major.
    Each image is decoded and transformed once, and held only while a batch needs it."""
    batch = []
    for i, path in enumerate(paths):
        image = open_image(path)
        tensor = predictor.image_tensor(image)
        for j in range(num_expressions):
            batch.append((i, j, image, tensor))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def predict_all(predictor, paths, expressions, out_dir, batch_size=8):
    """Every (image, expression) pair -> files in out_dir; returns the records (one per pair)."""
    input_ids, attention_mask, lengths = predictor.encode(expressions)
    stems = output_stems(paths)
    total, done, records = len(paths) * len(expressions), 0, []
    for batch in pair_batches(predictor, paths, len(expressions), batch_size):
        images = torch.stack([t for _, _, _, t in batch])
        js = torch.tensor([j for _, j, _, _ in batch])
        prob, mask = predictor(images, input_ids[js], attention_mask[js])
        for k, (i, j, image, _) in enumerate(batch):
            width, height = image.size
            full_prob = to_image_size(prob[k], height, width)
            full_mask = to_image_size(mask[k], height, width).bool()
            area, bbox, mean_prob = mask_stats(full_mask, full_prob)
            name = f'{stems[i]}_e{j}'
            write_png(out_dir / f'{name}_mask.png', full_mask.numpy().astype(np.uint8) * 255)
            write_png(out_dir / f'{name}_overlay.png', draw_overlay(image, full_mask, expressions[j]))
            records.append({'image': str(paths[i]), 'expression': expressions[j], 'mask': f'{name}_mask.png',
                            'overlay': f'{name}_overlay.png', 'width': width, 'height': height, 'area': area,
                            'bbox': bbox, 'mean_probability': mean_prob, 'tokens': lengths[j],
                            'truncated': lengths[j] > MAX_TOKENS})
        done += len(batch)
        logger.info(f'{done}/{total} (image, expression) pairs')
    return records


def write_png(path, picture):
    from PIL import Image
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    with atomic_file(path) as tmp:
        picture.save(tmp, format='PNG')


def warn_truncated(predictor, expressions, lengths):
    for j, (text, n) in enumerate(zip(expressions, lengths)):
        if n > MAX_TOKENS:
            kept = predictor.tokenizer.decode(predictor.encode([text])[0][0].tolist(), skip_special_tokens=True)
            logger.warning(f'warning: --expression {j + 1} has {n} tokens with [CLS]/[SEP]; cut to {MAX_TOKENS} as in '
                           f'training, so the model reads: "{kept}"')


def build(args, checkpoint):
    """Tokenizer, model and BERT with the checkpoint's weights, on args.device, in eval mode."""
    from bert.encoder import load_tokenizer
    tokenizer = load_tokenizer(args.bert_tokenizer)
    with contextlib.redirect_stdout(sys.stderr):  # the model builder prints; stdout is for JSON lines
        model, bert = build_model(args, pretrained='', checkpoint=checkpoint)
    key = load_model_and_bert(checkpoint, model, bert, key=args.weights_key, source=args.resume)
    model.eval()
    if bert is not None:
        bert.eval()
    return tokenizer, model, bert, key
