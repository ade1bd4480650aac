"""lib/training/losses.py: the reference's loss (weighted cross-entropy + 0.1 Dice) against its formula."""
import torch

from lib.training.losses import DiceLoss, SegmentationLoss, build_criterion


def reference_loss(logits, target):
    """Written out term by term: 0.9 * weighted-mean CE + 0.1 * sum over (sample, class) of 1 - Dice."""
    w = torch.tensor([0.9, 1.1])
    logp = logits.log_softmax(1)
    b, c, h, wd = logits.shape
    num, den = 0.0, 0.0
    for i in range(b):
        for y in range(h):
            for x in range(wd):
                t = target[i, y, x]
                num += -w[t] * logp[i, t, y, x]
                den += w[t]
    ce = num / den
    p = logits.softmax(1)
    dice = 0.0
    for i in range(b):
        for k in range(c):
            onehot = (target[i] == k).float()
            inter = (p[i, k] * onehot).sum()
            union = (p[i, k] + onehot).sum()
            dice += 1 - (2 * inter + 1e-6) / (union + 1e-6)
    return 0.9 * ce + 0.1 * dice


def test_loss_matches_reference_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 4)
    target = (torch.rand(2, 5, 4) > 0.5).long()
    got = build_criterion()(logits, target)
    assert torch.allclose(got, reference_loss(logits, target), atol=1e-5)


def test_dice_is_summed_over_batch_and_classes():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 6, 6)
    target = (torch.rand(1, 6, 6) > 0.5).long()
    one = DiceLoss()(logits, target)
    two = DiceLoss()(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1))
    assert torch.allclose(two, 2 * one)
    per = DiceLoss(reduction='none')(logits, target)
    assert per.shape == (1, 2)


def test_loss_perfect_prediction_is_small_and_gradients_flow():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    logits = torch.stack([(1 - target) * 20.0, target * 20.0], 1).float().requires_grad_()
    loss = SegmentationLoss()(logits, target)
    assert loss.item() < 1e-3
    loss.backward()
    assert torch.isfinite(logits.grad).all()
