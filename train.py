"""Train RMSIN on the refs of --refer_data_root: Only-Accurate / stage-1 teacher (no-mask root) or
Naive-WREL (all root). One process:

    python train.py --device cpu --dataset rrsisd --refer_data_root DATA --epochs 40 --img_size 480

or several, exactly as the original README:

    torchrun --nproc_per_node=4 train.py --dataset rrsisd --model_id RMSIN --refer_data_root DATA ...

`--resume model_last_<id>.pth` continues an interrupted run (weights, optimizer, schedule, epoch, RNG).
"""
import logging
import os
import time

import torch

import utils
from lib import distributed, engine
from lib.losses import build_criterion

logger = logging.getLogger('lrb')


def validate_args(args):
    """Checks that need no process group -> per-process batch size."""
    if args.epochs < 1:
        raise utils.InputError(f'--epochs {args.epochs}: must be >= 1')
    if args.img_size < 32 or args.img_size % 32:
        raise utils.InputError(f'--img_size {args.img_size}: must be a positive multiple of 32')
    if args.resume and not os.path.isfile(args.resume):
        raise utils.InputError(f'--resume {args.resume}: file not found')
    if not os.path.isdir(args.refer_data_root):
        raise utils.InputError(f'--refer_data_root {args.refer_data_root}: no such directory')
    if args.stop_after < 0:
        raise utils.InputError(f'--stop_after {args.stop_after}: must be >= 0')
    return distributed.per_process_batch_size(args.batch_size, distributed.launch_world_size())


def build_data(args, env, batch_size):
    from bert.encoder import load_tokenizer
    from refer.dataset import build_dataset
    tokenizer = load_tokenizer(args.bert_tokenizer)
    train_set = build_dataset(args, 'train', tokenizer, eval_mode=False)
    val_set = build_dataset(args, 'val', tokenizer, eval_mode=True, refer=train_set.refer)  # one REFER index
    workers = distributed.per_process_workers(args.workers, env.world_size)
    train_loader = engine.build_train_loader(train_set, batch_size, workers, args.seed, args.pin_mem, 'train')
    val_loader = engine.build_eval_loader(val_set, workers, args.pin_mem, 'val')
    return train_loader, val_loader


def dummy_forward(model, bert, args, device):
    """A one-sample forward for the unused-parameter check."""
    image = torch.zeros(1, 3, args.img_size, args.img_size, device=device)
    ids = torch.ones(1, 20, dtype=torch.long, device=device)
    mask = torch.zeros(1, 20, dtype=torch.long, device=device)
    mask[:, :2] = 1
    return lambda: engine.segment(model, bert, image, ids, mask)


def main(argv=None):
    args = utils.get_parser().parse_args(argv)
    batch_size = validate_args(args)
    env = distributed.init_distributed(args.device)
    try:
        run(args, env, batch_size)
    finally:
        distributed.cleanup_distributed()


def run(args, env, batch_size):
    distributed.setup_logging(env.rank)
    if args.amp and env.device.type != 'cuda':
        logger.info('--amp is for GPUs; running in float32 on CPU')
    distributed.seed_everything(args.seed, env.rank)
    logger.info(f'{env.world_size} process(es) on {env.device}; batch {batch_size} per process; '
                f'image size {args.img_size}')

    train_loader, val_loader = build_data(args, env, batch_size)
    model, bert = engine.build_model(args)
    model.to(env.device)
    if bert is not None:
        bert.to(env.device)
    checkpoint = None
    if args.resume:
        checkpoint = engine.load_checkpoint(args.resume, trust=args.trust_checkpoint)
        engine.load_model_and_bert(checkpoint, model, bert, key='model', source=args.resume)

    groups = engine.build_param_groups(model, bert)
    frozen = engine.freeze_unoptimized({'model': model, 'bert': bert}, groups)
    logger.info(f'{sum(p.numel() for g in groups for p in g["params"]):,} parameters optimized; '
                f'{len(frozen)} tensors never updated, as in the reference (BERT embeddings and layers >= 10)')
    find_unused = False
    if env.distributed:
        unused = engine.find_unused_parameters([m for m in (model, bert) if m is not None],
                                               dummy_forward(model, bert, args, env.device))
        find_unused = bool(unused)
    ddp_model = engine.wrap_for_distributed(model, env, find_unused)
    ddp_bert = engine.wrap_for_distributed(bert, env, find_unused)

    optimizer = engine.build_optimizer(groups, args)
    lr_scheduler = engine.build_poly_scheduler(optimizer, len(train_loader) * args.epochs)
    start_epoch, best_oiou = 0, -0.1
    if checkpoint is not None:
        start_epoch, best_oiou = engine.restore_training_state(checkpoint, optimizer, lr_scheduler, args.resume)
        logger.info(f'resumed {args.resume}: continuing at epoch {start_epoch}')
        del checkpoint
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the checkpoint already finished epoch {start_epoch - 1} of {args.epochs}')
        return

    def set_modes(training):
        ddp_model.train(training)
        if bert is not None:
            bert.eval()  # the reference's separate BERT never leaves eval mode (no dropout)

    def make_state(epoch, best):
        return engine.training_checkpoint(model, bert, optimizer, lr_scheduler, epoch, args, best)

    writer = engine.make_writer(args.output_dir, args.model_id)
    end_epoch = args.epochs if not args.stop_after else min(args.epochs, start_epoch + args.stop_after)
    start = time.time()
    engine.fit(train_step=engine.supervised_step(ddp_model, ddp_bert, build_criterion().to(env.device)),
               predict=engine.predict_fn(model, bert, args.amp),
               train_loader=train_loader, val_loader=val_loader, optimizer=optimizer,
               lr_scheduler=lr_scheduler, start_epoch=start_epoch, epochs=end_epoch, best_oiou=best_oiou,
               device=env.device, make_state=make_state, output_dir=args.output_dir, model_id=args.model_id,
               print_freq=args.print_freq, amp=args.amp, writer=writer, set_modes=set_modes)
    if writer is not None:
        writer.close()
    logger.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start))}')


if __name__ == '__main__':
    utils.run_cli(main)
