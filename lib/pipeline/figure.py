"""The qualitative figure (figure.png): test samples, their ground truth and each method's prediction."""
import contextlib
import io

import utils
from lib import files
from utils import InputError

from .config import METHODS, ratio_tag
from .manifests import read_json, write_json


def make_figure(plan, share, path, samples):
    """Rows of test samples; columns: the image with its expression, the ground truth, then each method's
    prediction (its best checkpoint, as tested), with its IoU."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from bert.encoder import load_tokenizer
    from lib.model.build import build_model, segment
    from lib.training.checkpoint import load_checkpoint, load_model_and_bert
    from lib.training.visualize import to_rgb
    from refer.dataset import ReferDataset
    from refer.refer import REFER

    cfg = plan.cfg
    ns = utils.get_parser().parse_args([str(x) for x in plan.test_common] + ['--refer_data_root', str(cfg.data)])
    tokenizer = load_tokenizer(ns.bert_tokenizer)
    refer = REFER(str(cfg.data), ns.dataset, ns.splitBy)
    dataset = ReferDataset(refer, 'test', tokenizer, ns.img_size, eval_mode=True, random_boxes=False,
                           check_images=False)
    n = min(samples, len(dataset))
    picks = sorted({round(i * (len(dataset) - 1) / max(1, n - 1)) for i in range(n)})
    items = [dataset[i] for i in picks]
    device = torch.device('cuda' if cfg.device == 'cuda' else 'cpu')
    columns = [(key, label) for key, label in METHODS]
    preds = {}
    for key, label in columns:
        ckpt = plan.methods[(share, key)]
        with contextlib.redirect_stdout(io.StringIO()):  # its 'randomly initialize' line: weights come next
            model, bert = build_model(ns, pretrained='')
        load_model_and_bert(load_checkpoint(str(ckpt)), model, bert, source=str(ckpt))
        model.to(device).eval()
        bert.to(device).eval()
        out = []
        with torch.no_grad():
            for item in items:
                logits = segment(model, bert, item['image'][None].to(device),
                                 item['input_ids'][:1].to(device), item['attention_mask'][:1].to(device))
                out.append(logits.argmax(1)[0].cpu())
        preds[key] = out
        del model, bert

    size = ns.img_size
    cell = size * max(1, -(-128 // size)) if size < 128 else min(size, 256)
    font = _font(12)
    pad, head, band = 4, 20, 46

    def tile(rgb, mask, color):  # rounds the blend (lib.training.visualize.tint truncates it)
        out = rgb.astype(np.float32).copy()
        if mask is not None:
            m = mask.numpy().astype(bool)
            out[m] = 0.5 * out[m] + 0.5 * np.array(color, np.float32)
        return Image.fromarray(out.round().astype(np.uint8)).resize((cell, cell), Image.NEAREST)

    titles = ['image + expression', 'ground truth'] + [label for _, label in columns]
    width = len(titles) * (cell + pad) + pad
    height = head + len(items) * (cell + band) + pad
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad) + 2, 4), title, fill=(0, 0, 0), font=font)
    import textwrap
    for r, item in enumerate(items):
        y = head + r * (cell + band)
        rgb = to_rgb(item['image'])
        target = item['target']
        ref = refer.Refs[item['ref_id']]
        tiles = [tile(rgb, None, None), tile(rgb, target, (0, 255, 0))]
        captions = [textwrap.wrap(f'"{ref["sentences"][0]["raw"]}"', width=max(12, cell // 7))[:3], []]
        for key, _ in columns:
            pred = preds[key][r]
            inter = int((pred.bool() & target.bool()).sum())
            union = int((pred.bool() | target.bool()).sum())
            tiles.append(tile(rgb, pred, (255, 0, 0)))
            captions.append([f'IoU {inter / union:.2f}' if union else 'IoU -'])
        for c, (t, lines) in enumerate(zip(tiles, captions)):
            x = pad + c * (cell + pad)
            canvas.paste(t, (x, y))
            for k, line in enumerate(lines):
                draw.text((x + 2, y + cell + 2 + 14 * k), line, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(path) as tmp:
        canvas.save(tmp, format='PNG', optimize=True)
    return path


def figure_step(plan, manifests, share, samples, say):
    """The figure, redrawn only when the checkpoints it shows or its size changed (figure.json says what it
    was drawn from). A failure is one line; the table is written by then."""
    cfg = plan.cfg
    path = cfg.out / 'figure.png'
    prefix = f'acc{ratio_tag(share)}'
    sources = {name: manifests.result_ids.get(name) for name in
               (f'{prefix}-only-accurate', f'{prefix}-naive-wrel', f'{prefix}-lrb-stage3')}
    key = {'share': share, 'samples': samples, 'sources': sources}
    old = read_json(cfg.out / 'figure.json')
    if path.is_file() and old == key:
        say(f'figure: reused ({path})')
        return path
    try:
        make_figure(plan, share, path, samples)
    except Exception as e:  # noqa: BLE001 - the table is there; say what failed in one line
        raise InputError(f'figure: {type(e).__name__}: {e} (the table is in {cfg.out / "table.md"})') from None
    write_json(cfg.out / 'figure.json', key)
    say(f'figure: drawn ({path})')
    return path


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()
