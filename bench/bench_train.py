"""Training speed and peak memory of the real engine step on synthetic batches (no dataset needed).

    .venv/bin/python bench/bench_train.py --device cpu --swin_type nano --img_size 64 -b 2 --iters 10
    .venv/bin/python bench/bench_train.py --device cuda --swin_type base --img_size 480 -b 8 --window12

--model lavt uses a randomly initialised BERT of --bert_hidden / --bert_layers (768 / 12 = BERT-base
shape) unless --ck_bert names a local BERT directory; --model lavt_one needs --ck_bert.
Prints iterations/s, samples/s and peak memory (GPU: max allocated; CPU: process max RSS).
"""
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils  # noqa: E402
from lib.model.build import build_model, text_encoder_of  # noqa: E402
from lib.training import distributed, engine  # noqa: E402
from lib.training.losses import build_criterion  # noqa: E402
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized  # noqa: E402
from lib.training.step import compile_step  # noqa: E402


def get_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    parser = utils.get_parser()
    parser.description = 'benchmark of the training step'
    parser.add_argument('--iters', default=20, type=int, help='timed iterations')
    parser.add_argument('--warmup', default=3, type=int, help='untimed iterations first')
    parser.add_argument('--bert_hidden', default=768, type=int, help='random BERT width (--model lavt)')
    parser.add_argument('--bert_layers', default=12, type=int, help='random BERT depth (--model lavt)')
    parser.set_defaults(pretrained_swin_weights='', device='cpu')
    return parser


def random_bert(hidden, layers):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden)
    bert = BertModel(cfg, add_pooling_layer=False)
    bert.pooler = None
    return bert.eval()


def build(args, device):
    from lib.model import segmentation
    if args.model == 'lavt' and not os.path.isdir(args.ck_bert):
        bert = random_bert(args.bert_hidden, args.bert_layers)
        model = segmentation.lavt('', args, text_dim=bert.config.hidden_size)
    else:
        model, bert = build_model(args, pretrained='')
    model.to(device)
    if bert is not None:
        bert.to(device)
    return model, bert


def synthetic_batch(batch, size, vocab):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 20, dtype=torch.long)
    mask[:, :8] = 1
    target = torch.zeros(batch, size, size, dtype=torch.long)
    target[:, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    return {'image': torch.randn(batch, 3, size, size, generator=g), 'target': target,
            'input_ids': torch.randint(1, vocab, (batch, 20), generator=g) * mask, 'attention_mask': mask}


def build_training(args, device):
    """The real stage-1 set-up on one synthetic batch: model, BERT, parameter groups, AdamW, poly schedule,
    criterion, and the step (under --compile: compiled as one graph) -> (step, optimizer, scheduler, batch, model)."""
    model, bert = build(args, device)
    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    optimizer = build_optimizer(groups, args)
    scheduler = build_poly_scheduler(optimizer, args.warmup + args.iters)
    text = text_encoder_of(model, bert)
    batch = synthetic_batch(args.batch_size, args.img_size, text.config.vocab_size)
    step = compile_step(engine.supervised_step(model, bert, build_criterion().to(device)), args)  # --compile
    model.train()
    return step, optimizer, scheduler, batch, model


def measure(args):
    """Time the real engine step (loss, parameter groups, optimizer, schedule) on one synthetic batch.
    -> {'it_per_s', 'samples_per_s', 'ms_per_it', 'peak_memory_mib', 'peak_memory_kind', 'device_name'}"""
    env = distributed.init_distributed(args.device)
    distributed.seed_everything(args.seed)
    device = env.device
    step, optimizer, scheduler, batch, _ = build_training(args, device)

    def run(n):
        loader = [batch] * n
        engine.train_one_epoch(step, loader, optimizer, scheduler, 0, device=device, print_freq=10 ** 9,
                               amp=args.amp)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    run(args.warmup)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(args.iters)
    elapsed = time.perf_counter() - start
    peak, kind, name = peak_memory(device)
    return {'it_per_s': args.iters / elapsed, 'samples_per_s': args.iters * args.batch_size / elapsed,
            'ms_per_it': 1000 * elapsed / args.iters, 'peak_memory_mib': peak, 'peak_memory_kind': kind,
            'device_name': name}


def peak_memory(device):
    """-> (peak MiB, what was measured, device name): GPU max allocated, or the process's max RSS."""
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated() / 2 ** 20, 'GPU (max allocated)',
                torch.cuda.get_device_name(device))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'RSS (process max)',
            f'CPU x{torch.get_num_threads()} threads')


def main(argv=None):
    args = get_args(argv)
    r = measure(args)
    print(f'model {args.model} swin {args.swin_type} img {args.img_size} batch {args.batch_size} '
          f'amp {args.amp} on {r["device_name"]}')
    print(f'{r["it_per_s"]:.3f} it/s  {r["samples_per_s"]:.2f} samples/s  {r["ms_per_it"]:.1f} ms/it  '
          f'peak memory {r["peak_memory_mib"]:.0f} MiB {r["peak_memory_kind"]}')


if __name__ == '__main__':
    utils.run_cli(main)
