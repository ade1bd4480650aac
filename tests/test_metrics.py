"""lib/training/metrics.py: oIoU, mIoU and prec@X on known masks, and the same result however the
evaluation is sharded over processes."""
import pytest
import torch

from lib.training import distributed, metrics


def test_sentence_iou_zero_cases():
    assert metrics.sentence_iou(0, 10) == 0.0
    assert metrics.sentence_iou(0, 0) == 0.0
    assert metrics.sentence_iou(3, 4) == 0.75


def logits_for(mask):
    return torch.stack([1 - mask.float(), mask.float()], 1)  # argmax == mask


def test_meter_summary_known_values():
    gt = torch.zeros(3, 4, 4, dtype=torch.long)
    gt[:, :2, :2] = 1                                  # 4 pixels each
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 1                                # IoU 1
    pred[1, :2, :1] = 1                                # I 2, U 4 -> 0.5
    pred[2, 3, 3] = 1                                  # I 0, U 5 -> 0
    m = metrics.RefSegMeter()
    m.update(logits_for(pred), gt, [(0, 0), (1, 0), (2, 0)])
    s = m.reduce().summary()
    assert s['num_sentences'] == 3
    assert s['cum_I'] == 6 and s['cum_U'] == 13
    assert s['oIoU'] == pytest.approx(100 * 6 / 13)
    assert s['mIoU'] == pytest.approx(100 * 1.5 / 3)
    assert s['precision@0.5'] == pytest.approx(200 / 3)
    assert s['precision@0.6'] == pytest.approx(100 / 3)
    assert s['precision@0.9'] == pytest.approx(100 / 3)
    text = metrics.format_results(s)
    assert 'overall IoU = 46.15' in text and 'precision@0.5 = 66.67' in text


def test_meter_reduction_independent_of_sharding(monkeypatch):
    torch.manual_seed(0)
    gt = (torch.rand(9, 6, 6) > 0.5).long()
    logits = torch.randn(9, 2, 6, 6)
    keys = [(i, 0) for i in range(9)]
    whole = metrics.RefSegMeter()
    whole.update(logits, gt, keys)
    shards = []
    for r in range(3):  # rank r takes r, r + 3, ... like ShardedEvalSampler
        m = metrics.RefSegMeter()
        idx = list(range(r, 9, 3))
        m.update(logits[idx], gt[idx], [keys[i] for i in idx])
        shards.append(m.records)
    monkeypatch.setattr(distributed, 'all_gather_objects', lambda obj: shards)
    assert metrics.RefSegMeter().reduce().summary() == whole.summary()
