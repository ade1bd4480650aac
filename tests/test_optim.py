"""lib/training/optim.py: the poly schedule per iteration, the reference's parameter groups (first ten BERT
layers), and the parameters it never updates."""
import pytest
import torch
import torch.nn as nn

from lib.training.optim import (
    build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized, unoptimized_parameters)
from stand_ins import TinyLavt, TinyLavtOne, opt_args, tiny_bert


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
