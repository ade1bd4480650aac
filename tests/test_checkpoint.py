"""lib/training/checkpoint.py: atomic saves, one-line load errors, the original's keys and `module.`
prefixes, a mismatching architecture named by its first key, the reference's file schedule, and a resume
that continues exactly (optimizer, schedule, RNG)."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

from lib.training import distributed
from lib.training.checkpoint import (
    checkpoint_paths, load_checkpoint, load_model_and_bert, load_weights, restore_training_state, save_checkpoint,
    save_epoch_checkpoints, training_checkpoint)
from stand_ins import TinyBackbone, TinyLavt, build_tiny_training, opt_args, run_steps, tiny_bert
from utils import InputError


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


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    distributed.seed_everything(3, rank=1)
    state = distributed.get_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(()).item())
    path = str(tmp_path / 'rng.pth')
    torch.save({'rng': state}, path)
    distributed.set_rng_state(load_checkpoint(path)['rng'])
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == a
