"""Speed and memory options (--checkpoint_activations, --channels_last, --fused_adamw, --compile): each
changes no math beyond rounding. One CPU training step of the nano RMSIN + small BERT through the engine
(build_model, build_optimizer, compile_step, train_one_epoch) against the same step without it.

--compile runs with the aot_eager backend here (dynamo capture + AOT autograd; with --checkpoint_activations),
under DDP with the eager one (capture and DDP's graph split): inductor's first compile of the model takes many minutes on a small
CPU. LRB_TEST_INDUCTOR=1 adds the inductor case.
"""
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import utils
from lib.model.backbone import MMBasicLayer
from lib.model.build import build_model
from lib.training import distributed, engine
from lib.training.checkpoint import load_weights
from lib.training.launch import check_compile_backend
from lib.training.losses import build_criterion
from lib.training.lrb.bank import N_PROMPT, ReferenceBank, filled_text_features
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized
from lib.training.step import compile_step
from lib.training.wrap import wrap_for_distributed

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device('cpu')


pytestmark = pytest.mark.usefixtures('one_thread_per_module')


def make_args(bert_dir, *flags):
    return utils.get_parser().parse_args(
        ['--device', 'cpu', '--swin_type', 'nano', '--img_size', '64', '--pretrained_swin_weights', '',
         '--ck_bert', str(bert_dir), '--bert_tokenizer', str(bert_dir), *flags])


def make_batch(vocab, batch=2, size=64):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 20, dtype=torch.long)
    mask[:, :7] = 1
    target = torch.zeros(batch, size, size, dtype=torch.long)
    target[:, 10:30, 20:50] = 1
    return {'image': torch.randn(batch, 3, size, size, generator=g), 'target': target,
            'input_ids': torch.randint(1, vocab, (batch, 20), generator=g) * mask, 'attention_mask': mask}


def build(bert_dir, *flags, wrap=None):
    """Model, BERT and optimizer as train.py builds them (same seed -> same weights)."""
    args = make_args(bert_dir, *flags)
    torch.manual_seed(0)
    model, bert = build_model(args)
    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    train_model = wrap(model) if wrap else model
    optimizer = build_optimizer(groups, args)
    return args, model, bert, train_model, optimizer


def one_step(bert_dir, *flags, wrap=None):
    """-> (loss, {name: grad}, {name: parameter after the step}, model, optimizer)."""
    args, model, bert, train_model, optimizer = build(bert_dir, *flags, wrap=wrap)
    scheduler = build_poly_scheduler(optimizer, 10)
    step = compile_step(engine.supervised_step(train_model, bert, build_criterion()), args,
                        distributed=wrap is not None)
    model.train()
    bert.eval()
    named = [(f'model.{n}', p) for n, p in model.named_parameters()] + \
            [(f'bert.{n}', p) for n, p in bert.named_parameters()]
    grads = {}

    def keep_grads(i, batch):  # the engine frees them after the optimizer step
        grads.update({n: p.grad.clone() for n, p in named if p.grad is not None})

    torch.manual_seed(1)  # the same drop-path / dropout draws
    loss = engine.train_one_epoch(step, [make_batch(bert.config.vocab_size)], optimizer, scheduler, 0, device=CPU,
                                  print_freq=1, after_backward=keep_grads)
    assert len(grads) > 100 and all(p.grad is None for _, p in named)
    params = {n: p.detach().clone() for n, p in named}
    params.update({f'model.{n}': b.detach().clone() for n, b in model.named_buffers()})  # BatchNorm statistics
    return loss, grads, params, model, optimizer


@pytest.fixture(scope='module')
def baseline(small_bert_dir):
    return one_step(small_bert_dir)


def assert_grads_close(grads, ref, rtol):
    """Per tensor, relative to the largest gradient of all (some gradients are mathematically zero, e.g.
    the attention key biases, and hold rounding noise only)."""
    assert grads.keys() == ref.keys()
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in grads.items():
        assert (g - ref[name]).abs().max().item() <= rtol * scale, name


def test_options_are_off_by_default(small_bert_dir, baseline):
    args = make_args(small_bert_dir)
    flags = (args.compile, args.fused_adamw, args.channels_last, args.checkpoint_activations)
    assert flags == ('', False, False, False)
    _, _, _, model, optimizer = baseline
    assert not any(m.use_checkpoint for m in model.modules() if isinstance(m, MMBasicLayer))
    assert not model.classifier.channels_last
    assert not optimizer.param_groups[0]['fused']
    step = engine.supervised_step(model, None, build_criterion())
    plain = step.loss
    assert compile_step(step, args).loss == plain  # not compiled
    assert make_args(small_bert_dir, '--compile').compile == 'inductor'


def test_checkpoint_activations_gives_the_same_step(small_bert_dir, baseline):
    loss, grads, params, model, _ = one_step(small_bert_dir, '--checkpoint_activations')
    layers = [m for m in model.modules() if isinstance(m, MMBasicLayer)]
    assert layers and all(m.use_checkpoint for m in layers)
    assert model.backbone.use_checkpoint and model.classifier.checkpoint_activations
    ref_loss, ref_grads, ref_params = baseline[:3]
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # weights, and BatchNorm statistics moved once (the replay in the backward pass does not move them)
    assert params.keys() == ref_params.keys() and all(torch.equal(params[n], ref_params[n]) for n in params)
    assert any('running_mean' in n and not torch.equal(p, torch.zeros_like(p)) for n, p in params.items())


def test_checkpoint_activations_gives_the_same_bank_gradient(small_bert_dir):
    """The LRB stages differentiate a frozen teacher with respect to the bank (stage 3 through
    torch.autograd.grad): with checkpointing, the same gradient and the same BatchNorm statistics."""
    results = []
    for flags in ((), ('--checkpoint_activations',)):
        _, model, bert, _, _ = build(small_bert_dir, *flags)
        for p in list(model.parameters()) + list(bert.parameters()):
            p.requires_grad_(False)
        model.train()
        bert.eval()
        torch.manual_seed(2)
        bank = ReferenceBank([5, 6], N_PROMPT, bert.config.hidden_size)
        batch = dict(make_batch(bert.config.vocab_size), ref_id=torch.tensor([5, 6]))
        torch.manual_seed(1)  # the same drop-path draws
        l_feats, l_mask = filled_text_features(bert, bank, batch)
        loss = build_criterion()(model(batch['image'], l_feats, l_mask), batch['target'])
        grad = torch.autograd.grad(loss, bank.embedding)[0]
        results.append((grad, {k: v.clone() for k, v in model.state_dict().items() if 'running_' in k}))
    (grad, stats), (grad_ck, stats_ck) = results
    assert grad.abs().sum() > 0 and torch.equal(grad, grad_ck)
    assert stats.keys() == stats_ck.keys() and all(torch.equal(stats[k], stats_ck[k]) for k in stats)


def test_channels_last_gives_the_same_step(small_bert_dir, baseline):
    loss, grads, _, model, _ = one_step(small_bert_dir, '--channels_last')
    convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    ref_loss, ref_grads = baseline[:2]
    # the NHWC convolution kernels round differently (one float32 ulp of the loss here), nothing else
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert_grads_close(grads, ref_grads, rtol=1e-4)
    # checkpoints move between the two layouts
    _, plain, _, _, _ = build(small_bert_dir)
    load_weights(plain, model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_fused_adamw_gives_the_same_step(small_bert_dir, baseline):
    loss, _, params, _, optimizer = one_step(small_bert_dir, '--fused_adamw')
    assert all(g['fused'] for g in optimizer.param_groups)
    ref_loss, _, ref_params = baseline[:3]
    assert loss == ref_loss
    eps = torch.finfo(torch.float32).eps
    for name, p in params.items():  # the fused kernel rounds the update differently: an ulp of the weights
        ref = ref_params[name]
        assert (p - ref).abs().max().item() <= 2 * eps * ref.abs().max().item(), name


def test_the_optimizer_flag_wins_over_the_checkpoint(small_bert_dir, baseline):
    _, _, _, _, fused = one_step(small_bert_dir, '--fused_adamw')
    _, _, _, _, plain = baseline
    # a fused checkpoint resumed without the flag: plain AdamW, its step count back on the host
    _, _, _, _, optimizer = build(small_bert_dir)
    optimizer.load_state_dict(fused.state_dict())
    assert not any(g['fused'] for g in optimizer.param_groups)
    steps = [s['step'] for s in optimizer.state.values()]
    assert steps and all(t.device.type == 'cpu' and t.dtype == torch.float32 and t.item() == 1 for t in steps)
    # a plain checkpoint resumed with the flag: fused
    _, _, _, _, optimizer = build(small_bert_dir, '--fused_adamw')
    optimizer.load_state_dict(plain.state_dict())
    assert all(g['fused'] for g in optimizer.param_groups)
    for p in optimizer.state:  # and it steps (the parameters that had a gradient before)
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(s['step'].item() == 2 for s in optimizer.state.values())


# (backend, extra flags): aot_eager with --checkpoint_activations, so that AOT autograd traces every module
# and the recomputed regions too (one compile instead of two); inductor (slow on a CPU) on request
COMPILE_CASES = [('aot_eager', ('--checkpoint_activations',))] + \
    ([('inductor', ())] if os.environ.get('LRB_TEST_INDUCTOR') == '1' else [])


@pytest.mark.parametrize('backend, flags', COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_gives_the_same_step(small_bert_dir, baseline, backend, flags):
    """Loss and gradients as eager up to rounding; BatchNorm statistics move once (also where the compiler
    recomputes a checkpointed region); checkpoints keep their keys."""
    torch._dynamo.reset()
    loss, grads, params, model, _ = one_step(small_bert_dir, '--compile', backend, *flags)
    ref_loss, ref_grads, ref_params = baseline[:3]
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert_grads_close(grads, ref_grads, rtol=1e-3)
    stats = [n for n in params if 'running_' in n]
    assert stats and all(torch.allclose(params[n], ref_params[n], rtol=1e-4, atol=1e-6) for n in stats)
    assert not any(k.startswith('_orig_mod') for k in model.state_dict())  # checkpoints keep their keys


def test_compile_under_ddp_gives_the_same_loss(small_bert_dir, baseline):
    """torch.compile of the DDP-wrapped model (as train.py does under torchrun), 1-process gloo group."""
    import torch.distributed as dist
    torch._dynamo.reset()
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        env = distributed.DistEnv(True, 0, 1, 0, CPU)
        loss, grads, _, _, _ = one_step(small_bert_dir, '--compile', 'eager',
                                        wrap=lambda m: wrap_for_distributed(m, env))
    finally:
        dist.destroy_process_group()
    ref_loss, ref_grads = baseline[:2]
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert_grads_close(grads, ref_grads, rtol=1e-3)


def test_unknown_compile_backend_is_one_line(small_bert_dir):
    with pytest.raises(utils.InputError, match='--compile nosuch: unknown torch.compile backend'):
        check_compile_backend(make_args(small_bert_dir, '--compile', 'nosuch'))


# ----------------------------------------------------------------------------------------------------------
# bench/compare_original.py at a tiny size: the original (when a clone is at .original or $LRB_ORIGINAL_DIR)
# and ours with the same weights give the same logits, and its variants run (the other options' variants
# differ only in the flags already tested above)

def _original_dir():
    path = Path(os.environ.get('LRB_ORIGINAL_DIR', REPO / '.original'))
    return path if (path / 'train.py').is_file() else None


def test_compare_original_same_model_and_variants_run():
    import sys
    sys.path.insert(0, str(REPO / 'bench'))
    import compare_original as co
    original = co.import_original(_original_dir()) if _original_dir() else None
    cfg = dict(swin_type='tiny', img_size=64, batch=2, bert_layers=1) if original else \
        dict(swin_type='nano', img_size=64, batch=2, bert_layers=1, bert_width=32)  # (the original needs 768)
    variants = ['original', 'fp32', 'fp32+checkpoint', 'fp32+checkpoint+ddp']
    lines = []
    figures = co.run_comparison(cfg, device='cpu', original=original, variants=variants, warmup=1, rounds=1, iters=1,
                                log=lines.append)
    ran = figures['variants']
    assert set(ran) == set(variants[0 if original else 1:]) and not [v for v in ran.values() if 'error' in v]
    assert all(e['it_per_s'] > 0 and e['peak_allocated_gib'] > 0 for e in ran.values())
    assert ran['fp32+checkpoint']['activations_gib'] < ran['fp32']['activations_gib'] / 2
    # (at this size the peak is the optimizer step's, the same with and without checkpointing)
    assert ran['fp32+checkpoint']['peak_allocated_gib'] <= ran['fp32']['peak_allocated_gib']
    assert figures['flops_per_step'] > 0
    if original is not None:  # the original rebuilt at 64 px (its 480-px constants shimmed) is our model
        assert figures['max_abs_logit_diff'] < 1e-5
        assert ran['fp32']['speedup_vs_original'] > 0
        assert 'lib' in sys.modules and sys.modules['lib'].__file__.startswith(str(REPO / 'lib'))  # ours again


def test_compare_original_variant_names():
    import sys
    sys.path.insert(0, str(REPO / 'bench'))
    import compare_original as co
    assert co.parse_variant('bf16+compile+cudagraphs+fused_adamw') == ('bf16', {'compile', 'cudagraphs', 'fused_adamw'})
    assert co.parse_variant('fp32+cudagraphs') == ('fp32', {'cudagraphs'})  # --cuda_graphs, compiled or not
    for bad in ('fp32+cudagraphs+ddp', 'original+ddp', 'fp16', 'fp32+nosuch'):
        with pytest.raises(utils.InputError, match=re.escape(f'--variants {bad}:')):
            co.parse_variant(bad)
    names = ['bf16', 'bf16+fused_adamw', 'bf16+compile+cudagraphs+fused_adamw']
    parsed = {v: co.parse_variant(v) for v in names}
    assert co._twin_of(names[2], parsed, names) == 'bf16+fused_adamw'  # its eager twin: the same options


def test_peak_tensor_memory_counts_each_live_storage_once():
    import sys
    sys.path.insert(0, str(REPO / 'bench'))
    import compare_original as co
    before = torch.zeros(1000)  # 4,000 bytes alive at the start
    elsewhere = torch.zeros(3000)  # allocated before and not given: its views are not counted
    with co.PeakTensorMemory([before]) as memory:
        a = torch.ones(2000)  # + 8,000
        b = a.view(-1, 2) * 2  # the view shares a's storage; the product is + 8,000
        view = elsewhere.view(-1, 3).detach()
        del a, b
        after = torch.empty(500)  # + 2,000
    assert memory.peak == 4000 + 8000 + 8000 and memory.now == 4000 + 2000
    assert after.numel() == 500 and view.numel() == 3000
