"""lib/training/engine.py: one epoch steps optimizer, schedule and hooks; evaluation covers every sentence
and writes overlays (stand-in modules, no dataset)."""
import os

import numpy as np
import torch

from lib.model.build import segment
from lib.training import engine
from lib.training.losses import build_criterion
from lib.training.visualize import OverlayWriter
from stand_ins import TinyLavtOne, build_tiny_training, make_batch


class ListLoader(list):
    sampler = None


def test_train_one_epoch_steps_schedule_and_hook():
    model, bert, opt, sched = build_tiny_training()
    seen = []
    loader = ListLoader(make_batch(seed=i) for i in range(3))
    loss = engine.train_one_epoch(engine.supervised_step(model, bert, build_criterion()), loader, opt, sched,
                                  0, device=torch.device('cpu'), print_freq=2,
                                  after_step=lambda i, b: seen.append(i))
    assert seen == [0, 1, 2] and sched.last_epoch == 3 and np.isfinite(loss)


def test_evaluate_every_sentence_and_overlays(tmp_path):
    torch.manual_seed(0)
    model = TinyLavtOne(layers=2).eval()
    items = []
    for i in range(3):
        b = make_batch(b=1, seed=i)
        k = i + 1  # item i holds i + 1 sentences: [1, K, N]
        items.append(dict(b, input_ids=b['input_ids'][:, None].repeat(1, k, 1),
                          attention_mask=b['attention_mask'][:, None].repeat(1, k, 1),
                          index=torch.tensor([i])))
    calls = []

    def predict(batch):
        assert batch['input_ids'].shape == (1, 6)
        calls.append((int(batch['index']), batch['sentence']))
        return segment(model, None, batch['image'], batch['input_ids'], batch['attention_mask'])

    vis = OverlayWriter(str(tmp_path / 'vis'), 2)
    meter = engine.evaluate(predict, ListLoader(items), torch.device('cpu'), on_prediction=vis)
    assert calls == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert meter.summary()['num_sentences'] == 6
    assert sorted(os.listdir(tmp_path / 'vis')) == ['00000_s0.png', '00001_s0.png', '00001_s1.png']
    from PIL import Image
    w, h = Image.open(tmp_path / 'vis' / '00000_s0.png').size
    assert w == 3 * 256 and h > 256  # 16-px input enlarged to 256, text band below
