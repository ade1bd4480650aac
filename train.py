"""Train RMSIN on the refs of --refer_data_root: Only-Accurate / stage-1 teacher (no-mask root) or
Naive-WREL (all root). One process:

    python train.py --device cpu --dataset rrsisd --refer_data_root DATA --epochs 40 --img_size 480

or several, exactly as the original README:

    torchrun --nproc_per_node=4 train.py --dataset rrsisd --model_id RMSIN --refer_data_root DATA ...

`--resume model_last_<id>.pth` continues an interrupted run (weights, optimizer, schedule, epoch, RNG).
"""
import logging
import time

import utils
from lib.files import guard_run_dir
from lib.model.build import build_model, dummy_forward
from lib.training.checkpoint import (
    check_checkpoint_space, load_checkpoint, load_model_and_bert, restore_stage1_files, restore_training_state,
    run_file_names, stage1_saver, training_checkpoint)
from lib.training.data import build_data
from lib.training.cuda_graphs import build_update
from lib.training.engine import fit, predict_fn, supervised_step
from lib.training.launch import end_epoch, launch, start_run
from lib.training.losses import build_criterion
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized
from lib.training.step import compile_step
from lib.training.summary import make_writer
from lib.training.wrap import find_unused_parameters, wrap_for_distributed

logger = logging.getLogger('lrb')


def main(argv=None):
    return launch(run, argv)


def run(args, env, batch_size):
    # before anything slow: refuse to replace a finished run, check the folder (the data are checked
    # while the datasets are built, the free space once the model and optimizer exist)
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    guard_run_dir(args.output_dir, run_file_names(args.model_id, last_epoch),
                  resume=args.resume, overwrite=args.overwrite, resume_hint=f'model_last_{args.model_id}.pth')
    start_run(args, env, batch_size)
    _, _, train_loader, val_loader = build_data(args, env, batch_size)
    checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint) if args.resume else None
    # resume: the weights come from the checkpoint, next
    model, bert = build_model(args, pretrained='' if args.resume else None, checkpoint=checkpoint)
    model.to(env.device)
    if bert is not None:
        bert.to(env.device)
    if checkpoint is not None:
        load_model_and_bert(checkpoint, model, bert, key='model', source=args.resume)

    groups = build_param_groups(model, bert)
    frozen = freeze_unoptimized({'model': model, 'bert': bert}, groups)
    logger.info(f'{sum(p.numel() for g in groups for p in g["params"]):,} parameters optimized; '
                f'{len(frozen)} tensors never updated, as in the reference (BERT embeddings and layers >= 10)')
    find_unused = False
    if env.distributed:
        unused = find_unused_parameters([m for m in (model, bert) if m is not None],
                                        dummy_forward(model, bert, args.img_size, env.device))
        find_unused = bool(unused)
    ddp_model = wrap_for_distributed(model, env, find_unused)
    ddp_bert = wrap_for_distributed(bert, env, find_unused)
    optimizer = build_optimizer(groups, args)
    lr_scheduler = build_poly_scheduler(optimizer, len(train_loader) * args.epochs)
    start_epoch, best_oiou = 0, -0.1
    if checkpoint is not None:
        start_epoch, best_oiou = restore_training_state(checkpoint, optimizer, lr_scheduler, args.resume)
        logger.info(f'resumed {args.resume}: continuing at epoch {start_epoch}')
        restore_stage1_files(checkpoint, args.resume, args.output_dir, args.model_id)  # a kill before the copies
        del checkpoint
    stop_epoch = end_epoch(args, start_epoch)
    if stop_epoch is None:
        return

    def set_modes(training):
        ddp_model.train(training)
        if bert is not None:
            bert.eval()  # the reference's separate BERT never leaves eval mode (no dropout)

    def make_state(epoch, best):
        return training_checkpoint(model, bert, optimizer, lr_scheduler, epoch, args, best)

    check_checkpoint_space(args.output_dir, (model, bert), optimizer,
                                  replaces=run_file_names(args.model_id, 0))
    writer = make_writer(args.output_dir, args.model_id, fresh=args.overwrite)
    start = time.time()
    # --compile: BERT + RMSIN + loss as one graph; evaluation (predict) stays eager on the plain modules
    step = compile_step(supervised_step(ddp_model, ddp_bert, build_criterion().to(env.device)), args, env.distributed)
    fit(train_step=step, update=build_update(step, optimizer, args, env.device), predict=predict_fn(model, bert, args.amp),
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer,
        lr_scheduler=lr_scheduler, start_epoch=start_epoch, epochs=stop_epoch, best={'oIoU': best_oiou},
        device=env.device, save=stage1_saver(make_state, args.output_dir, args.model_id),
        print_freq=args.print_freq, amp=args.amp, writer=writer, set_modes=set_modes)
    if writer is not None:
        writer.close()
    logger.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start))}')


if __name__ == '__main__':
    utils.run_cli(main)
