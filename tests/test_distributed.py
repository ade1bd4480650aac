"""lib/training/distributed.py and wrap.py: per-process batch sizes and device errors, the sharded
evaluation sampler, and the unused-parameter probe DDP needs."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_workers_split_as_the_reference_or_auto_from_the_cpus(monkeypatch):
    assert [distributed.per_process_workers(8, n) for n in (1, 3, 4)] == [8, 3, 2]  # ceil(8 / n), as the reference
    assert distributed.per_process_workers(0, 4) == 0
    for cpus, local, want in ((64, 1, 8), (64, 4, 8), (32, 4, 7), (16, 8, 1), (2, 1, 1), (1, 1, 1)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)))  # more CPUs than this machine has
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local))
        assert distributed.per_process_workers('auto', local) == want, (cpus, local)


def test_auto_workers_follow_the_process_affinity():
    """A real process restricted to one CPU (as a SLURM cpuset would) counts 1 CPU and gets 1 worker."""
    code = ('import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); '
            'from refer.check import cpus_per_local_process; from lib.training.distributed import per_process_workers; '
            'print(cpus_per_local_process(), per_process_workers("auto", 1))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ['1', '1']
