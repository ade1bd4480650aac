"""The training step off the host (issue 21), checked on a CPU:

- each stage's step (stage 1's BERT + RMSIN + loss, stage 2's bank fill + frozen teacher + loss, stage 3's
  student step and bank step) traces into one graph without a break (torch._dynamo.explain) on the nano
  RMSIN, and `--compile` compiles it with fullgraph=True to the eager updates (stand-in network);
- the update a CUDA graph captures reads nothing from the host: it runs on the meta device, where a host
  read (.item(), nonzero's size, bool()) raises, and any CPU operand is recorded;
- `--cuda_graphs`' optimizer (AdamW capturable, learning rates as device tensors) follows the poly schedule
  in place and keeps plain floats in checkpoints, which load either way; the flag is one line on a CPU.
The capture and replay themselves need a GPU: the last test, skipped here (bench/gpu_check.py runs it too).
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import train
import utils
from lib.model import segmentation
from lib.training import engine
from lib.training.cuda_graphs import GraphedUpdate, graph_stage3
from lib.training.losses import build_criterion
from lib.training.lrb.bank import ReferenceBank, build_bank_optimizer
from lib.training.lrb.stages import Stage2Bank, Stage3Joint
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized
from lib.training.step import SupervisedStep, compile_step
from stand_ins import TinyLavt, make_batch, opt_args, tiny_bert

pytestmark = pytest.mark.usefixtures('one_thread_per_module')

BANK_IDS = [100, 101, 102]
REF_IDS = [100, 7, 102, 8]  # two weak samples, two accurate


def nano(text_dim):
    args = utils.get_parser().parse_args(['--device', 'cpu', '--swin_type', 'nano', '--img_size', '64',
                                          '--pretrained_swin_weights', ''])
    return segmentation.lavt('', args, text_dim=text_dim)


def build_stages(network, hidden, size, device='cpu', seed=0):
    """{name: (loss function, its inputs)} of every stage's step as the scripts build them (modes included)."""
    torch.manual_seed(seed)
    bert = tiny_bert(2, hidden=hidden).eval()
    model = network(hidden)
    bank = ReferenceBank(BANK_IDS, n_prompt=4, dim=hidden)
    crit = build_criterion()
    for m in (bert, model, bank, crit):
        m.to(device)
    batch = dict(make_batch(b=4, s=size, n=10, seed=3), ref_id=torch.tensor(REF_IDS))
    batch = {k: v if k in engine.HOST_KEYS else v.to(device) for k, v in batch.items()}
    stage1 = SupervisedStep(model.train(), bert, crit)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    stage2 = Stage2Bank(copy.deepcopy(model).train().requires_grad_(False), bert, bank, crit)
    bank_opt = build_bank_optimizer(bank, 1e-2, opt_args())
    joint = Stage3Joint(model.train(), teacher, bert, bank, crit, bank_opt, build_poly_scheduler(bank_opt, 4),
                        inner_steps=1, update_every=1, is_weak=torch.ones(4, dtype=torch.bool), batch_size=4,
                        world_size=1, seed=0, steps_per_epoch=1)
    return {'stage1': (stage1.loss, stage1.inputs(batch)),
            'stage2': (stage2.loss, stage2.inputs(batch)),
            'stage3-student': (joint.loss, joint.inputs(batch)),
            'stage3-bank': (joint.bank_loss, joint.inputs(batch))}, bank


@pytest.fixture(scope='module')
def nano_stages():
    return build_stages(nano, 32, 64)[0]


@pytest.mark.parametrize('name', ['stage1', 'stage2', 'stage3-student', 'stage3-bank'])
def test_each_stage_step_is_one_graph(nano_stages, name):
    fn, inputs = nano_stages[name]
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(fn)(*inputs)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


# --- the update reads nothing from the host -------------------------------------------------------------

class HostOperands(TorchDispatchMode):
    """Records every operator that gets a CPU tensor (not a 0-dim scalar) while the computation runs on
    the meta device: in a CUDA graph that would be a host-to-device copy baked into the graph."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, torch.Tensor) and t.device.type == 'cpu' and t.dim() > 0
               for t in tree_leaves((args, kwargs))):
            self.ops.append(str(func))
        return func(*args, **kwargs)


def host_operands(fn, inputs, wrt):
    """Forward and backward of fn(*inputs) (the gradient to `wrt`), once to warm up (caches), then watched."""
    torch.autograd.grad(fn(*inputs), wrt)
    with HostOperands() as seen:
        torch.autograd.grad(fn(*inputs), wrt)
    return seen.ops


@pytest.fixture(scope='module')
def meta_stages():
    return build_stages(nano, 32, 64, device='meta')


@pytest.mark.parametrize('name', ['stage1', 'stage2', 'stage3-student', 'stage3-bank'])
def test_the_update_reads_nothing_from_the_host(meta_stages, name):
    stages, bank = meta_stages
    fn, inputs = stages[name]
    owner = fn.__self__
    trained = [bank.embedding] if name in ('stage2', 'stage3-bank') else \
        [p for m in (owner.model if name == 'stage1' else owner.student, owner.bert) for p in m.parameters()
         if p.requires_grad]
    assert trained and all(p.device.type == 'meta' for p in trained)
    assert host_operands(fn, inputs, trained) == []


def test_the_host_check_catches_a_host_read_and_a_host_operand(meta_stages):
    stages, bank = meta_stages
    image = stages['stage1'][1][0]
    with pytest.raises((RuntimeError, NotImplementedError)):  # a data-dependent size (nonzero) needs values
        with HostOperands():
            image.sum((1, 2, 3)).gt(0).nonzero()
    host_index = torch.tensor([0, 2])
    device_index = host_index.to('meta')
    with HostOperands() as seen:
        bank.embedding[device_index].sum()  # on the device already: fine
        host_index.to('meta')  # a host-to-device copy inside the update: recorded
        bank.embedding.index_select(0, host_index)  # a host operand: recorded
    assert seen.ops == ['aten._to_copy.default', 'aten.index_select.default']


# --- --compile: each stage's step compiled with fullgraph=True gives the eager update -------------------

def run_stage(name, backend):
    """Two updates of stage `name` on the stand-in network through the engine -> (trained tensors before,
    after)."""
    stages, bank = build_stages(lambda dim: TinyLavt(dim), 16, 16, seed=1)
    fn, _ = stages[name]
    owner = fn.__self__
    if backend:
        compile_step(owner, utils.get_parser().parse_args(['--compile', backend]))
    batch = dict(make_batch(b=4, s=16, n=10, seed=3), ref_id=torch.tensor(REF_IDS))
    if name == 'stage3-bank':  # the inner loop alone (before_step), twice
        owner.plan = [True, True]
        before = [bank.embedding.detach().clone()]
        for i in range(2):
            owner.before_step(i, batch)
        return before, [bank.embedding.detach().clone()]
    if name == 'stage2':
        params, optimizer = [bank.embedding], build_bank_optimizer(bank, 1e-2, opt_args())
    else:
        model = owner.model if name == 'stage1' else owner.student
        groups = build_param_groups(model, owner.bert)
        freeze_unoptimized({'model': model, 'bert': owner.bert}, groups)
        params, optimizer = [p for g in groups for p in g['params']], build_optimizer(groups, opt_args(lr=1e-2))
    before = [p.detach().clone() for p in params]
    engine.train_one_epoch(owner, [batch, batch], optimizer, build_poly_scheduler(optimizer, 4), 0,
                           device=torch.device('cpu'), print_freq=1)
    return before, [p.detach().clone() for p in params]


@pytest.mark.parametrize('name', ['stage1', 'stage2', 'stage3-student', 'stage3-bank'])
def test_compiled_fullgraph_step_gives_the_eager_update(name):
    torch._dynamo.reset()
    try:
        before, compiled = run_stage(name, 'aot_eager')
    finally:
        torch._dynamo.reset()
    _, eager = run_stage(name, '')
    assert len(compiled) == len(eager) > 0
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(before[:1] + before[-1:], eager[:1] + eager[-1:]))  # trained


# --- --cuda_graphs' optimizer and flag --------------------------------------------------------------------

def graphs_optimizer(**flags):
    torch.manual_seed(0)
    model = TinyLavt()
    groups = build_param_groups(model, tiny_bert(2))
    return build_optimizer(groups, opt_args(lr=1e-2, **flags))


@pytest.mark.filterwarnings('ignore:Detected call of .lr_scheduler.step')  # no step: only the lrs
def test_cuda_graphs_optimizer_learning_rates_are_device_tensors_filled_by_the_schedule():
    optimizer = graphs_optimizer(cuda_graphs=True)
    rates = [g['lr'] for g in optimizer.param_groups]
    assert all(torch.is_tensor(r) and r.dim() == 0 for r in rates)
    assert all(g['capturable'] and g['foreach'] for g in optimizer.param_groups)
    scheduler = build_poly_scheduler(optimizer, 10)
    for _ in range(3):
        scheduler.step()
    # the same tensors (a captured graph reads their memory), holding the schedule's value
    assert all(g['lr'] is r for g, r in zip(optimizer.param_groups, rates))
    plain = graphs_optimizer()
    plain_scheduler = build_poly_scheduler(plain, 10)
    for _ in range(3):
        plain_scheduler.step()
    assert [float(r) for r in rates] == pytest.approx([g['lr'] for g in plain.param_groups], rel=1e-6)
    assert scheduler.state_dict()['base_lrs'] == plain_scheduler.state_dict()['base_lrs'] == [1e-2] * 4


@pytest.mark.filterwarnings('ignore:Detected call of .lr_scheduler.step')  # no step: only the lrs
def test_cuda_graphs_checkpoints_keep_float_rates_and_load_either_way():
    optimizer = graphs_optimizer(cuda_graphs=True)
    build_poly_scheduler(optimizer, 10).step()
    state = optimizer.state_dict()
    assert all(type(g['lr']) is float and type(g['initial_lr']) is float for g in state['param_groups'])
    plain = graphs_optimizer()
    plain.load_state_dict(copy.deepcopy(state))  # a --cuda_graphs checkpoint resumes without it (and in the original)
    assert all(type(g['lr']) is float and not g['capturable'] for g in plain.param_groups)
    again = graphs_optimizer(cuda_graphs=True)
    again.load_state_dict(plain.state_dict())  # and the other way round: device rates and capturable again
    assert all(torch.is_tensor(g['lr']) and g['capturable'] for g in again.param_groups)
    assert [float(g['lr']) for g in again.param_groups] == pytest.approx([g['lr'] for g in plain.param_groups])


def test_cuda_graphs_on_a_cpu_is_one_line(tmp_path):
    with pytest.raises(utils.InputError, match=r'^--cuda_graphs: needs a CUDA device \(--device cuda\)'):
        train.main(['--device', 'cpu', '--cuda_graphs', '--refer_data_root', str(tmp_path),
                    '--output-dir', str(tmp_path / 'out')])


# --- the capture itself (GPU) -----------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: capturing and replaying the update')
@pytest.mark.parametrize('name', ['stage1', 'stage2', 'stage3'])
def test_cuda_graph_updates_equal_the_eager_ones(name):
    """Six iterations (3 eager warm-up, the capture, 2 replays) of each stage on the stand-in network:
    the same trained tensors as the eager engine, to rounding."""
    device = torch.device('cuda')
    results = []
    for graphs in (False, True):
        stages, bank = build_stages(lambda dim: TinyLavt(dim), 16, 16, device=device, seed=1)
        owner = stages['stage1' if name == 'stage1' else 'stage2' if name == 'stage2' else 'stage3-student'][0].__self__
        args = opt_args(lr=1e-2, cuda_graphs=graphs)
        if name == 'stage2':
            params, optimizer = [bank.embedding], build_bank_optimizer(bank, 1e-2, args)
        else:
            model = owner.model if name == 'stage1' else owner.student
            groups = build_param_groups(model, owner.bert)
            freeze_unoptimized({'model': model, 'bert': owner.bert}, groups)
            params, optimizer = [p for g in groups for p in g['params']], build_optimizer(groups, args)
        hooks = {}
        if name == 'stage3':
            owner.bank_optimizer = build_bank_optimizer(bank, 1e-2, args)
            owner.bank_scheduler = build_poly_scheduler(owner.bank_optimizer, 12)
            owner.plan = [True] * 6
            params = params + [bank.embedding]
            hooks = dict(before_step=owner.before_step)
            if graphs:
                graph_stage3(owner)
        update = GraphedUpdate(owner, optimizer, device=device) if graphs else None
        batches = [{k: v if k in engine.HOST_KEYS else v.to(device) for k, v in
                    dict(make_batch(b=4, s=16, n=10, seed=i), ref_id=torch.tensor(REF_IDS)).items()}
                   for i in range(6)]
        engine.train_one_epoch(owner, batches, optimizer, build_poly_scheduler(optimizer, 12), 0, device=device,
                               print_freq=1, update=update, **hooks)
        if graphs:
            assert update.captured.graph is not None
        results.append([p.detach().clone() for p in params])
    for eager, graphed in zip(*results):
        assert torch.allclose(eager, graphed, rtol=1e-4, atol=1e-6)
