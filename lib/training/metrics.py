"""Referring-segmentation metrics as the paper reports them.

Per sentence: prediction = argmax over the 2 logits at network resolution, I = |pred & gt|,
U = |pred | gt|, IoU = I / U, and 0 when I == 0 or U == 0 (as the reference `IoU`).
Over a split: overall IoU = sum(I) / sum(U), mean IoU = mean of per-sentence IoUs,
precision@t = share of sentences with IoU >= t, t in 0.5 ... 0.9.

Each process keeps (key, I, U, area, pixels) per sentence (area: target pixels, pixels: H*W; for the
per-sentence records of lib.evaluation); `reduce()` gathers them from all ranks and sorts by key, so the
numbers are bit-identical whether one or K processes evaluated the split.
"""
import numpy as np
import torch

from . import distributed

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred, target):
    """pred, target [B, H, W] with values in {0, 1} -> (I [B], U [B]) int64."""
    pred = pred.bool()
    target = target.bool()
    inter = (pred & target).flatten(1).sum(1)
    union = (pred | target).flatten(1).sum(1)
    return inter, union


def sentence_iou(inter, union):
    inter, union = int(inter), int(union)
    if inter == 0 or union == 0:
        return 0.0
    return inter / union


class RefSegMeter:
    """Accumulates per-sentence intersections and unions."""

    def __init__(self):
        # (key, I, U, area, pixels); key orders sentences identically for any number of ranks
        self.records = []

    def update(self, logits, target, keys):
        """logits [B, 2, H, W], target [B, H, W], keys: B sortable ids (e.g. (dataset index, sentence))."""
        inter, union = intersection_union(logits.argmax(1), target)
        area = target.bool().flatten(1).sum(1)
        pixels = target[0].numel() if len(target) else 0
        for key, i, u, a in zip(keys, inter.tolist(), union.tolist(), area.tolist()):
            self.records.append((key, int(i), int(u), int(a), pixels))

    def reduce(self):
        """Gather every rank's records (sorted by key). Collective: call on all ranks."""
        gathered = distributed.all_gather_objects(self.records)
        merged = sorted((r for part in gathered for r in part), key=lambda r: r[0])
        out = RefSegMeter()
        out.records = merged
        return out

    def ious(self):
        return [sentence_iou(r[1], r[2]) for r in self.records]

    def summary(self):
        """Metrics in percent, as printed in the paper."""
        n = len(self.records)
        cum_i = sum(r[1] for r in self.records)
        cum_u = sum(r[2] for r in self.records)
        ious = np.array(self.ious(), dtype=np.float64)
        result = {
            'oIoU': 100.0 * cum_i / cum_u if cum_u > 0 else 0.0,
            'mIoU': 100.0 * float(ious.mean()) if n else 0.0,
        }
        for t in PREC_THRESHOLDS:
            result[f'precision@{t}'] = 100.0 * float((ious >= t).sum()) / n if n else 0.0
        result.update(num_sentences=n, cum_I=cum_i, cum_U=cum_u)
        return result


def format_results(summary):
    """The reference's final printout."""
    lines = ['Final results:', 'Mean IoU is %.2f' % summary['mIoU'], '']
    for t in PREC_THRESHOLDS:
        lines.append('    precision@%s = %.2f' % (t, summary[f'precision@{t}']))
    lines.append('    overall IoU = %.2f' % summary['oIoU'])
    return '\n'.join(lines)


def tensor_keys(index, sentence):
    """Keys for a batch: dataset indices [B] (tensor or list) with a sentence number."""
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    return [(int(i), int(sentence)) for i in index]
