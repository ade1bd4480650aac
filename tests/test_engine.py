"""Unit tests of the engine's pure parts: loss, metrics, schedule, parameter groups, checkpoints,
resume of optimizer/schedule/RNG, samplers and the evaluation loop (stand-in modules, no dataset)."""
import argparse
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel

from lib.model.build import segment, text_features
from lib.training import distributed, engine, metrics
from lib.training.checkpoint import (
    checkpoint_paths, load_checkpoint, load_model_and_bert, load_weights, restore_training_state, save_checkpoint,
    save_epoch_checkpoints, training_checkpoint)
from lib.training.losses import DiceLoss, SegmentationLoss, build_criterion
from lib.training.optim import (
    build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized, unoptimized_parameters)
from lib.training.visualize import OverlayWriter
from lib.training.wrap import find_unused_parameters
from utils import InputError


# --- stand-ins ----------------------------------------------------------------------------------

def tiny_bert(layers=12, hidden=16):
    cfg = BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    bert = BertModel(cfg, add_pooling_layer=False)
    bert.pooler = None
    return bert


class TinyBackbone(nn.Module):
    def __init__(self, text_dim=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 3, padding=1)
        self.norm0 = nn.LayerNorm(8)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(4, 2))
        self.text_proj = nn.Linear(text_dim, 8)

    def forward(self, x, l_feats, l_mask):
        v = self.patch_embed(x)  # [B, 8, H, W]
        w = (l_feats * l_mask.permute(0, 2, 1)).sum(-1) / l_mask.sum(1).clamp_min(1)  # [B, C]
        v = v + self.text_proj(w)[:, :, None, None]
        v = self.norm0(v.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + self.relative_position_bias_table.sum()
        return v


class TinyLavt(nn.Module):
    """Same calling convention as lib.segmentation.lavt: model(image, l_feats, l_mask)."""

    def __init__(self, text_dim=16):
        super().__init__()
        self.backbone = TinyBackbone(text_dim)
        self.classifier = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, image, l_feats, l_mask):
        return self.classifier(self.backbone(image, l_feats, l_mask))


class TinyLavtOne(TinyLavt):
    def __init__(self, layers=12):
        super().__init__()
        self.text_encoder = tiny_bert(layers)

    def forward(self, image, input_ids, attention_mask):
        l_feats, l_mask = text_features(self.text_encoder, input_ids, attention_mask)
        return super().forward(image, l_feats, l_mask)


def make_batch(b=2, s=16, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, n, dtype=torch.long)
    mask[:, :3] = 1
    return {'image': torch.randn(b, 3, s, s, generator=g),
            'target': (torch.rand(b, s, s, generator=g) > 0.6).long(),
            'input_ids': torch.randint(1, 30, (b, n), generator=g) * mask,
            'attention_mask': mask,
            'index': torch.arange(b), 'ref_id': torch.arange(b) + 100}


def opt_args(**kw):
    base = dict(lr=3e-5, weight_decay=0.01, amsgrad=False)
    base.update(kw)
    return argparse.Namespace(**base)


# --- loss ---------------------------------------------------------------------------------------

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


# --- metrics ------------------------------------------------------------------------------------

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


def test_sharded_eval_sampler_covers_each_index_once():
    for n, k in [(10, 3), (2, 4), (7, 1)]:
        got = [i for r in range(k) for i in distributed.ShardedEvalSampler(n, r, k)]
        assert sorted(got) == list(range(n))


# --- optimization -------------------------------------------------------------------------------

def test_poly_schedule_per_iteration():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-5)
    sched = build_poly_scheduler(opt, total_iters=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    for it, lr in enumerate(lrs[:10]):
        assert lr == pytest.approx(3e-5 * (1 - it / 10) ** 0.9)
    assert lrs[10] == 0.0 and lrs[11] == 0.0  # clamped, not a complex number


def test_param_groups_lavt_first_ten_bert_layers():
    model, bert = TinyLavt(), tiny_bert(12)
    groups = build_param_groups(model, bert)
    assert len(groups) == 4
    assert groups[0]['weight_decay'] == 0.0 and 'weight_decay' not in groups[1]
    ids = lambda ps: {id(p) for p in ps}
    bb = dict(model.backbone.named_parameters())
    assert ids(groups[0]['params']) == ids([bb['norm0.weight'], bb['norm0.bias'], bb['relative_position_bias_table']])
    assert ids(groups[1]['params']) == ids([v for k, v in bb.items() if 'norm' not in k and 'relative' not in k])
    assert ids(groups[2]['params']) == ids(model.classifier.parameters())
    assert ids(groups[3]['params']) == ids(p for i in range(10) for p in bert.encoder.layer[i].parameters())
    opt = build_optimizer(groups, opt_args(amsgrad=True))
    assert [g['weight_decay'] for g in opt.param_groups] == [0.0, 0.01, 0.01, 0.01]
    assert all(g['amsgrad'] for g in opt.param_groups) and opt.param_groups[0]['lr'] == 3e-5
    # BERT embeddings and layers 10, 11 are not optimized (as the reference); nothing of the model is left out
    left = unoptimized_parameters({'model': model, 'bert': bert}, groups)
    assert left and all(n.startswith(('bert.embeddings', 'bert.encoder.layer.10', 'bert.encoder.layer.11'))
                        for n in left)
    frozen = freeze_unoptimized({'model': model, 'bert': bert}, groups)
    assert frozen == left
    assert not bert.embeddings.word_embeddings.weight.requires_grad
    assert bert.encoder.layer[9].output.dense.weight.requires_grad


def test_param_groups_lavt_one_small_bert_takes_all_layers():
    model = TinyLavtOne(layers=4)
    groups = build_param_groups(model)
    assert {id(p) for p in groups[3]['params']} == {id(p) for p in model.text_encoder.encoder.parameters()}
    left = unoptimized_parameters({'': model}, groups)
    assert left and all(n.startswith('text_encoder.embeddings') for n in left)


def test_find_unused_parameters_and_modes_restored():
    model, bert = TinyLavt(), tiny_bert(2)
    model.train()
    extra = nn.Linear(2, 2)
    model.unused = extra
    b = make_batch()
    running = model.classifier[1].running_mean.clone()
    unused = find_unused_parameters(
        [model, bert], lambda: segment(model, bert, b['image'], b['input_ids'], b['attention_mask']))
    assert unused == ['unused.weight', 'unused.bias']
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(running, model.classifier[1].running_mean)


# --- checkpoints --------------------------------------------------------------------------------

def test_save_checkpoint_atomic_and_namespace_args(tmp_path):
    model = TinyLavt()
    path = tmp_path / 'sub' / 'model_last_x.pth'
    save_checkpoint({'model': model.state_dict(), 'args': argparse.Namespace(a=1, b='x')}, str(path))
    assert os.listdir(path.parent) == ['model_last_x.pth']
    ck = load_checkpoint(str(path))
    assert ck['args'].a == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match='file not found'):
        load_checkpoint(str(tmp_path / 'nope.pth'))
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(InputError, match='bad.pth'):
        load_checkpoint(str(bad))
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'obj': TinyBackbone}, str(evil))  # a class reference: refused by default
    with pytest.raises(InputError, match='trust_checkpoint'):
        load_checkpoint(str(evil))
    assert load_checkpoint(str(evil), trust=True)['obj'] is TinyBackbone


def test_original_checkpoint_keys_with_module_prefixes(tmp_path):
    """The reference saves its DDP-wrapped BERT (`module.` keys) and the args Namespace; old
    transformers also stored embeddings.position_ids."""
    src_model, src_bert = TinyLavt(), tiny_bert(3)
    bert_state = {f'module.{k}': v for k, v in src_bert.state_dict().items()}
    bert_state['module.embeddings.position_ids'] = torch.arange(32)[None]
    path = tmp_path / 'orig.pth'
    torch.save({'model': src_model.state_dict(), 'bert_model': bert_state, 'epoch': 15,
                'args': argparse.Namespace(model='lavt', swin_type='base'), 'optimizer': {}, 'lr_scheduler': {}},
               str(path))
    model, bert = TinyLavt(), tiny_bert(3)
    key = load_model_and_bert(load_checkpoint(str(path)), model, bert)
    assert key == 'model'
    for k, v in src_bert.state_dict().items():
        assert torch.equal(bert.state_dict()[k], v)
    for k, v in src_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    # DDP-prefixed model keys and a stage-3 'student_model' load as well
    torch.save({'student_model': {f'module.{k}': v for k, v in src_model.state_dict().items()}},
               str(tmp_path / 's3.pth'))
    fresh = TinyLavt()
    assert load_model_and_bert(load_checkpoint(str(tmp_path / 's3.pth')), fresh, None) == 'student_model'
    assert torch.equal(fresh.classifier[0].weight, src_model.classifier[0].weight)


def test_other_architecture_names_first_mismatching_key():
    model = TinyLavt()
    state = TinyLavt(text_dim=24).state_dict()
    with pytest.raises(InputError, match=r"backbone\.text_proj\.weight.*\(8, 24\).*\(8, 16\)"):
        load_weights(model, state, 'ck.pth')
    state = dict(TinyLavt().state_dict())
    state['backbone.extra.weight'] = torch.zeros(2)
    with pytest.raises(InputError, match="unexpected key 'backbone.extra.weight'"):
        load_weights(model, state, 'ck.pth')
    state = dict(TinyLavt().state_dict())
    del state['classifier.0.bias']
    with pytest.raises(InputError, match="missing key 'classifier.0.bias'"):
        load_weights(model, state, 'ck.pth')
    with pytest.raises(InputError, match="no 'bert_model' entry"):
        load_model_and_bert({'model': TinyLavt().state_dict()}, TinyLavt(), tiny_bert(2))


def test_checkpoint_schedule_of_names(tmp_path):
    assert set(checkpoint_paths('o', 'M', 9)) == {'last', 'best'}
    assert checkpoint_paths('o', 'M', 10)['epoch'].endswith('model_epoch_10.pth')
    assert 'epoch' not in checkpoint_paths('o', 'M', 12)
    assert checkpoint_paths('o', 'M', 15)['epoch'].endswith('model_epoch_15.pth')
    state = {'x': torch.ones(1)}
    save_epoch_checkpoints(state, str(tmp_path), 'M', 15, is_best=True)
    assert sorted(os.listdir(tmp_path)) == ['model_best_M.pth', 'model_epoch_15.pth', 'model_last_M.pth']


def run_steps(model, bert, opt, sched, steps, start=0):
    crit = build_criterion()
    step = engine.supervised_step(model, bert, crit)
    model.train()
    for i in range(start, start + steps):
        loss = step(make_batch(seed=i))
        # randomness consumed between steps, as augmentations would
        loss = loss + 0 * torch.rand(()) + 0 * float(np.random.rand()) + 0 * random.random()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def build_tiny_training(seed=0):
    torch.manual_seed(seed)
    model, bert = TinyLavt(), tiny_bert(2)
    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    opt = build_optimizer(groups, opt_args(lr=1e-2))
    return model, bert, opt, build_poly_scheduler(opt, 6)


def test_restore_training_state_continues_exactly(tmp_path):
    distributed.seed_everything(5)
    model, bert, opt, sched = build_tiny_training()
    run_steps(model, bert, opt, sched, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    distributed.seed_everything(5)
    model, bert, opt, sched = build_tiny_training()
    run_steps(model, bert, opt, sched, 3)
    path = str(tmp_path / 'model_last.pth')
    save_checkpoint(training_checkpoint(model, bert, opt, sched, 0, opt_args(), 12.5), path)
    torch.manual_seed(123), np.random.seed(1), random.seed(2)  # scramble: resume must restore the RNG

    model, bert, opt, sched = build_tiny_training(seed=99)
    ck = load_checkpoint(path)
    load_model_and_bert(ck, model, bert)
    start_epoch, best = restore_training_state(ck, opt, sched)
    assert (start_epoch, best) == (1, 12.5) and sched.last_epoch == 3
    run_steps(model, bert, opt, sched, 3, start=3)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-7, rtol=0), k


def test_restore_requires_optimizer_entry():
    model, bert, opt, sched = build_tiny_training()
    with pytest.raises(InputError, match="no 'optimizer' entry"):
        restore_training_state({'model': {}, 'epoch': 3}, opt, sched)


# --- loops --------------------------------------------------------------------------------------

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


# --- process set-up -----------------------------------------------------------------------------

def test_batch_split_and_device_errors(monkeypatch):
    assert distributed.per_process_batch_size(8, 2) == 4
    with pytest.raises(InputError, match='--batch-size 6 is not divisible by the 4 processes'):
        distributed.per_process_batch_size(6, 4)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(InputError, match='--device cuda: no CUDA GPU'):
        distributed.init_distributed('cuda')
    with pytest.raises(InputError, match='expected cpu'):
        distributed.init_distributed('tpu')
    env = distributed.init_distributed('cpu')
    assert (env.distributed, env.rank, env.world_size, env.device.type) == (False, 0, 1, 'cpu')


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    distributed.seed_everything(3, rank=1)
    state = distributed.get_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(()).item())
    path = str(tmp_path / 'rng.pth')
    torch.save({'rng': state}, path)
    distributed.set_rng_state(load_checkpoint(path)['rng'])
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == a
