"""Segmentation loss of the reference: (1 - w) * weighted cross-entropy + w * Dice, w = 0.1.

Cross-entropy uses class weights [0.9, 1.1] (background, object) with the weighted mean reduction of
`nn.CrossEntropyLoss`. The Dice term is computed per (sample, class) on softmax probabilities and
summed over both (reduction 'sum'), as the reference does, so it grows with the batch size.

`SegmentationLoss.masked(logits, target, keep)` is the same loss of the samples where `keep` is True, computed
on the whole batch (static shapes: no data-dependent indexing), equal to the loss of that subset.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DiceLoss(nn.Module):
    def __init__(self, smooth=1e-6, reduction='sum'):
        super().__init__()
        if reduction not in ('sum', 'mean', 'none'):
            raise ValueError(f'reduction {reduction!r}')
        self.smooth = smooth
        self.reduction = reduction

    def terms(self, logits, target):
        """The loss per (sample, class), [B, C]: logits [B, C, H, W], target [B, H, W] int in [0, C)."""
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)  # [B, C, H, W]
        dims = tuple(range(2, probs.dim()))
        inter = (probs * onehot).sum(dims)
        union = (probs + onehot).sum(dims)
        return 1 - (2 * inter + self.smooth) / (union + self.smooth)

    def forward(self, logits, target):
        loss = self.terms(logits, target)
        if self.reduction == 'sum':
            return loss.sum()
        if self.reduction == 'mean':
            return loss.mean()
        return loss


class SegmentationLoss(nn.Module):
    """`Loss` / `SupervisedLoss` of the reference (loss/loss.py)."""

    def __init__(self, class_weights=(0.9, 1.1), dice_weight=0.1):
        super().__init__()
        # a buffer, so `.to(device)` moves it with the module
        self.register_buffer('class_weights', torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.dice = DiceLoss()
        self.dice_weight = dice_weight

    def forward(self, logits, target):
        logits = logits.float()
        target = target.long()
        ce = F.cross_entropy(logits, target, weight=self.class_weights.to(logits.device))
        return (1 - self.dice_weight) * ce + self.dice_weight * self.dice(logits, target)

    def masked(self, logits, target, keep):
        """forward(logits[keep], target[keep]) without selecting: keep [B] bool (on logits' device).

        Cross-entropy: the class-weighted sum over the kept samples' pixels over the sum of their weights
        (nn.CrossEntropyLoss's weighted mean on the subset); Dice: summed over the kept samples. The other
        samples add exactly 0 to the loss (torch.where, not a product). No kept sample: 0, with a zero
        gradient.
        """
        logits = logits.float()
        target = target.long()
        weights = self.class_weights.to(logits.device)
        pixel = keep.view(-1, *([1] * (target.dim() - 1)))  # [B, 1, 1]
        ce = F.cross_entropy(logits, target, weight=weights, reduction='none')  # w[y] * nll, [B, H, W]
        ce_sum = torch.where(pixel, ce, 0).sum()
        weight_sum = torch.where(pixel, weights[target], 0).sum()
        ce = ce_sum / weight_sum.clamp_min(torch.finfo(weight_sum.dtype).tiny)
        dice = torch.where(keep[:, None], self.dice.terms(logits, target), 0).sum()
        return (1 - self.dice_weight) * ce + self.dice_weight * dice


def build_criterion(dice_weight=0.1):
    return SegmentationLoss(class_weights=(0.9, 1.1), dice_weight=dice_weight)
