"""lib/training/distributed.py and wrap.py: per-process batch sizes and device errors, the sharded
evaluation sampler, and the unused-parameter probe DDP needs."""
import pytest
import torch
import torch.nn as nn

from lib.model.build import segment
from lib.training import distributed
from lib.training.wrap import find_unused_parameters
from stand_ins import TinyLavt, make_batch, tiny_bert
from utils import InputError


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


def test_sharded_eval_sampler_covers_each_index_once():
    for n, k in [(10, 3), (2, 4), (7, 1)]:
        got = [i for r in range(k) for i in distributed.ShardedEvalSampler(n, r, k)]
        assert sorted(got) == list(range(n))


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
