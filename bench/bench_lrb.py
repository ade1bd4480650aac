"""Time per iteration of the LRB stages against a stage-1 step at the same batch, and the cost of the fill.

    .venv/bin/python bench/bench_lrb.py --device cpu --swin_type nano --img_size 64 -b 8
    python bench/bench_lrb.py --device cuda --swin_type base --img_size 480 -b 8 --window12 --bank_refs 11000

Each stage runs its real code (lib/training/lrb hooks inside engine.train_one_epoch) on one synthetic batch:
stage 1 = engine.supervised_step; stage 2 = Stage2Bank (frozen teacher, bank only); stage 3 =
Stage3Joint with --caption_inner_steps bank steps at every iteration (the most expensive case, as
at the 10 % setting where nearly every batch holds weak samples). --weak_share of the batch is weak.
The bank has --bank_refs rows (about 11,000 at RRSIS-D's 10 % setting): its AdamW step is dense, as the
original's. The variants alternate over --rounds rounds; the fastest round counts.
"""
import copy
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402
from bench import bench_train  # noqa: E402
from lib.model.build import text_encoder_of  # noqa: E402
from lib.training import distributed, engine  # noqa: E402
from lib.training.cuda_graphs import build_update, graph_stage3  # noqa: E402
from lib.training.losses import build_criterion  # noqa: E402
from lib.training.lrb.bank import N_PROMPT, ReferenceBank, build_bank_optimizer  # noqa: E402
from lib.training.lrb.stages import Stage2Bank, Stage3Joint  # noqa: E402
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized  # noqa: E402
from lib.training.step import compile_step  # noqa: E402


def get_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    parser = bench_train.build_parser()
    parser.description = 'LRB stage iterations against a stage-1 step'
    parser.add_argument('--bank_refs', default=2000, type=int, help='rows of the reference bank')
    parser.add_argument('--weak_share', default=0.75, type=float, help='share of each batch that is weak')
    parser.add_argument('--rounds', default=2, type=int, help='alternating rounds; the fastest counts')
    return parser


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def build_stages(args):
    """The three stages' real code on one synthetic batch -> namespace: device, batch, bank, text (BERT),
    n (steps per variant call), optimizers (model's AdamW, bank's AdamW), variants {'stage1', 'stage2',
    'stage3': a callable running n steps of that stage through engine.train_one_epoch}."""
    env = distributed.init_distributed(args.device)
    distributed.seed_everything(args.seed)
    device = env.device
    model, bert = bench_train.build(args, device)
    text = text_encoder_of(model, bert)
    batch = bench_train.synthetic_batch(args.batch_size, args.img_size, text.config.vocab_size)
    n_weak = round(args.weak_share * args.batch_size)
    batch['ref_id'] = torch.cat([torch.arange(n_weak), args.bank_refs + torch.arange(args.batch_size - n_weak)])
    batch = engine.to_device(batch, device)
    criterion = build_criterion().to(device)
    bank = ReferenceBank(range(args.bank_refs), N_PROMPT, text.config.hidden_size).to(device)

    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    optimizer = build_optimizer(groups, args)
    scheduler = build_poly_scheduler(optimizer, 10 ** 6)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank_opt = build_bank_optimizer(bank, 1e-6, args)
    bank_sched = build_poly_scheduler(bank_opt, 10 ** 6)
    n = args.warmup + args.iters
    joint = Stage3Joint(model, teacher, bert, bank, criterion, bank_opt, bank_sched,
                        inner_steps=args.caption_inner_steps, update_every=1,
                        is_weak=torch.ones(1, dtype=torch.bool), batch_size=args.batch_size, world_size=1,
                        seed=0, steps_per_epoch=n, amp=args.amp)
    joint.plan = [True] * n  # a bank step at every iteration
    # stage 2 trains the bank alone through a frozen copy in train mode (as the original)
    frozen = copy.deepcopy(model).train()
    for p in frozen.parameters():
        p.requires_grad_(False)
    # --compile: each stage's step one graph; --cuda_graphs: each update replayed (as the scripts set them up)
    stage1 = compile_step(engine.supervised_step(model, bert, criterion), args)
    stage2 = compile_step(Stage2Bank(frozen, bert, bank, criterion), args)
    compile_step(joint, args)
    if getattr(args, 'cuda_graphs', False):
        graph_stage3(joint)
    updates = {'stage1': build_update(stage1, optimizer, args, device),
               'stage2': build_update(stage2, bank_opt, args, device),
               'stage3': build_update(joint, optimizer, args, device)}

    def epoch(name, step, opt, sched, **hooks):
        engine.train_one_epoch(step, [batch] * n, opt, sched, 0, device=device, print_freq=10 ** 9, amp=args.amp,
                               update=updates[name], **hooks)

    variants = {
        'stage1': lambda: epoch('stage1', stage1, optimizer, scheduler),
        'stage2': lambda: epoch('stage2', stage2, bank_opt, bank_sched, after_backward=stage2.after_backward),
        'stage3': lambda: epoch('stage3', joint, optimizer, scheduler, before_step=joint.before_step,
                                after_step=joint.after_step),
    }
    model.train()
    bert.eval()
    return SimpleNamespace(device=device, batch=batch, bank=bank, text=text, n=n, optimizers=(optimizer, bank_opt),
                           variants=variants)


def measure(args):
    """-> {'stage1_ms', 'stage2_ms', 'stage3_ms', 'fill_ms', 'stage3_over_stage1', 'fill_share_of_stage3',
    'peak_memory_mib', 'device_name'}"""
    s = build_stages(args)
    device, batch, bank, text, n, variants = s.device, s.batch, s.bank, s.text, s.n, s.variants
    times = {k: float('inf') for k in variants}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name] = min(times[name], (time.perf_counter() - start) / n)

    words = text.embeddings.word_embeddings(batch['input_ids'])
    reps = 50
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        bank.fill(batch['ref_id'], words, batch['attention_mask'])
    _sync(device)
    fill = (time.perf_counter() - start) / reps
    peak, _, name = bench_train.peak_memory(device)
    return {'stage1_ms': 1000 * times['stage1'], 'stage2_ms': 1000 * times['stage2'],
            'stage3_ms': 1000 * times['stage3'], 'fill_ms': 1000 * fill,
            'stage3_over_stage1': times['stage3'] / times['stage1'],
            'stage2_over_stage1': times['stage2'] / times['stage1'],
            'fill_share_of_stage3': fill / times['stage3'], 'peak_memory_mib': peak, 'device_name': name,
            'bank_refs': args.bank_refs, 'batch': args.batch_size, 'inner_steps': args.caption_inner_steps}


def main(argv=None):
    args = get_args(argv)
    r = measure(args)
    print(f'swin {args.swin_type} img {args.img_size} batch {args.batch_size} amp {args.amp} bank {args.bank_refs} '
          f'refs, inner steps {args.caption_inner_steps}, on {r["device_name"]}')
    print(f'stage 1 {r["stage1_ms"]:.1f} ms/it | stage 2 {r["stage2_ms"]:.1f} ms/it '
          f'(x{r["stage2_over_stage1"]:.2f}) | stage 3 {r["stage3_ms"]:.1f} ms/it (x{r["stage3_over_stage1"]:.2f})')
    print(f'fill {r["fill_ms"]:.3f} ms = {100 * r["fill_share_of_stage3"]:.2f} % of a stage-3 iteration; '
          f'peak memory {r["peak_memory_mib"]:.0f} MiB')


if __name__ == '__main__':
    utils.run_cli(main)
