"""LRB-WREL stage 3: the student trains on accurate + weak expressions while the bank keeps learning
through an EMA teacher. As the original command:

    torchrun --nproc_per_node=4 train_stu_tea.py --dataset rrsisd --model_id RMSIN \
        --refer_data_root splits/rrsisd-90-all --epochs 40 --img_size 480 --lr 2e-5 \
        --caption_lr 1e-6 --caption_inner_steps 1 --caption_update_every 1 \
        --resume checkpoints/model_epoch_15.pth --caption_embedding_path stage2/caption_embeddings_RMSIN.pt \
        --ck_bert BERT_DIR --bert_tokenizer BERT_DIR

Student and teacher start from --resume's 'model' (BERT from its 'bert_model'), the bank from stage 2's
file (its ref ids are the weak set). Each iteration: `--caption_inner_steps` bank steps through the
frozen teacher on the batch's weak samples (every `--caption_update_every` iterations, when any process
has a weak sample), one student step on the whole batch with the weak samples filled from the bank,
then teacher <- EMA of the student's parameters. The student is validated on val (accurate expressions,
no bank). Files: model_best_oIoU_<id>.pth, model_best_mIoU_<id>.pth (and their banks
caption_embeddings_<id>_oIoU_best.pt / _mIoU_best.pt), model_last_<id>.pth (everything needed to
continue with --resume).
"""
import copy
import logging
import os

import torch

import utils
from lib.model.build import build_model, dummy_forward
from lib.training.checkpoint import (
    check_checkpoint_space, copy_atomic, load_model_and_bert, load_weights, restore_best_files, restore_training_state,
    save_checkpoint, training_checkpoint)
from lib.training.data import build_data
from lib.training.cuda_graphs import build_update, graph_stage3
from lib.training.engine import fit, predict_fn
from lib.training.launch import end_epoch, launch
from lib.training.losses import build_criterion
from lib.training.lrb.bank import ReferenceBank, bank_path, build_bank_optimizer, check_bank_in_sync
from lib.training.lrb.schedule import count_bank_steps
from lib.training.lrb.stages import Stage3Joint, open_stage_run, stage_file_names, validate_stage_args
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized
from lib.training.step import compile_step
from lib.training.summary import make_writer
from lib.training.wrap import find_unused_parameters, wrap_for_distributed

logger = logging.getLogger('lrb')

STAGE = 3


def main(argv=None):
    return launch(run, argv, validate=validate_args)


def validate_args(args):
    return validate_stage_args(args, STAGE)  # --caption_lr / _inner_steps / _update_every: utils.FLAG_RULES


def run(args, env, batch_size):
    checkpoint, resuming = open_stage_run(args, env, batch_size, STAGE)
    if resuming:
        bank = ReferenceBank.from_state(checkpoint.get('caption_bank'), f'--resume {args.resume}')
        bank_source = f'--resume {args.resume}'
    else:
        if not args.caption_embedding_path:
            raise utils.InputError('--caption_embedding_path: give the stage-2 bank (caption_embeddings_<id>.pt)')
        bank = ReferenceBank.from_file(args.caption_embedding_path)
        bank_source = f'--caption_embedding_path {args.caption_embedding_path}'
    train_set, _, train_loader, val_loader = build_data(args, env, batch_size)

    student, bert = build_model(args, pretrained='', checkpoint=checkpoint)
    bank.check_dim(bert.config.hidden_size, bank_source)
    bank.check_covers(train_set, bank_source)
    load_model_and_bert(checkpoint, student, bert, key='student_model' if resuming else 'model',
                        source=args.resume)
    teacher = copy.deepcopy(student)
    if resuming:
        load_weights(teacher, checkpoint['teacher_model'], args.resume, 'teacher_model')
    for p in teacher.parameters():
        p.requires_grad_(False)
    is_weak = torch.tensor([r in bank.sample_id_to_index for r in train_set.ref_ids])
    logger.info(f'{int(is_weak.sum())} of {len(train_set)} train refs are weak; bank of {len(bank)} refs from '
                f'{bank_source}')

    groups = build_param_groups(student, bert)
    freeze_unoptimized({'model': student, 'bert': bert}, groups)
    for module in (student, teacher, bert, bank):
        module.to(env.device)
    find_unused = False
    if env.distributed:
        find_unused = bool(find_unused_parameters(
            [student, bert], dummy_forward(student, bert, args.img_size, env.device)))
    ddp_student = wrap_for_distributed(student, env, find_unused)
    ddp_bert = wrap_for_distributed(bert, env, find_unused)

    optimizer = build_optimizer(groups, args)
    lr_scheduler = build_poly_scheduler(optimizer, len(train_loader) * args.epochs)
    total_bank_steps = count_bank_steps(is_weak, batch_size, env.world_size, args.seed, args.epochs,
                                        args.caption_update_every, args.caption_inner_steps)
    bank_optimizer = build_bank_optimizer(bank, args.caption_lr, args)
    bank_scheduler = build_poly_scheduler(bank_optimizer, total_bank_steps)
    logger.info(f'{total_bank_steps} bank steps in {args.epochs} epochs of {len(train_loader)} iterations')

    def best_file(metric):
        return os.path.join(args.output_dir, f'model_best_{metric}_{args.model_id}.pth')

    start_epoch, best = 0, {'oIoU': -0.1, 'mIoU': -0.1}
    if resuming:
        start_epoch, best['oIoU'] = restore_training_state(checkpoint, optimizer, lr_scheduler, args.resume)
        best['mIoU'] = float(checkpoint.get('best_miou', -0.1))
        bank_optimizer.load_state_dict(checkpoint['bank_optimizer'])
        bank_scheduler.load_state_dict(checkpoint['bank_lr_scheduler'])
        logger.info(f'resumed stage 3 from {args.resume}: continuing at epoch {start_epoch}')
        # a kill between model_last and the best files: the bank (as resumed) first, then the checkpoint
        restore_best_files(checkpoint, args.resume, {m: best_file(m) for m in best},
                           before=lambda m: bank.save(bank_path(args.output_dir, args.model_id, f'{m}_best')))
    del checkpoint
    stop_epoch = end_epoch(args, start_epoch)
    if stop_epoch is None:
        return

    joint = Stage3Joint(ddp_student, teacher, ddp_bert, bank, build_criterion().to(env.device),
                        bank_optimizer, bank_scheduler, inner_steps=args.caption_inner_steps,
                        update_every=args.caption_update_every, is_weak=is_weak, batch_size=batch_size,
                        world_size=env.world_size, seed=args.seed, steps_per_epoch=len(train_loader),
                        amp=args.amp)
    # --compile: the student's step and the bank's step each one graph; --cuda_graphs: each replayed
    compile_step(joint, args, env.distributed)
    if args.cuda_graphs:
        graph_stage3(joint)

    def set_modes(training):
        ddp_student.train(training)
        teacher.eval()  # frozen; BatchNorm statistics stay as loaded
        bert.eval()  # the separate BERT never leaves eval mode (no dropout), as the original

    def on_epoch_start(epoch):
        check_bank_in_sync(bank)
        joint.on_epoch_start(epoch)

    def save(epoch, summary, improved, best):
        state = training_checkpoint(
            student, bert, optimizer, lr_scheduler, epoch, args, best['oIoU'], model_key='student_model',
            teacher_model=teacher.state_dict(), caption_bank=bank.state(), bank_optimizer=bank_optimizer.state_dict(),
            bank_lr_scheduler=bank_scheduler.state_dict(), best_miou=best['mIoU'], lrb_stage=STAGE,
            best_metrics=sorted(improved))  # for restore_best_files after a kill before the copies
        last = os.path.join(args.output_dir, f'model_last_{args.model_id}.pth')
        save_checkpoint(state, last)
        for metric in sorted(improved):  # the bank first: a best checkpoint of this epoch implies its bank
            bank.save(bank_path(args.output_dir, args.model_id, f'{metric}_best'))
            copy_atomic(last, best_file(metric))
        logger.info(f'saved {last}' + (f' (best {", ".join(sorted(improved))})' if improved else ''))

    check_checkpoint_space(args.output_dir, (student, teacher, bert, bank), [optimizer, bank_optimizer],
                                  replaces=stage_file_names(STAGE, args.model_id))
    writer = make_writer(args.output_dir, args.model_id, fresh=args.overwrite)
    fit(train_step=joint, update=build_update(joint, optimizer, args, env.device), predict=predict_fn(student, bert, args.amp),
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer, lr_scheduler=lr_scheduler,
        start_epoch=start_epoch, epochs=stop_epoch, best=best, device=env.device, save=save,
        print_freq=args.print_freq, amp=args.amp, writer=writer, set_modes=set_modes,
        on_epoch_start=on_epoch_start, before_step=joint.before_step, after_step=joint.after_step)
    check_bank_in_sync(bank)
    logger.info(f'{joint.bank_steps_taken} bank steps taken in this run; schedule at '
                f'{bank_scheduler.last_epoch} of {total_bank_steps}')
    if writer is not None:
        writer.close()


if __name__ == '__main__':
    utils.run_cli(main)
