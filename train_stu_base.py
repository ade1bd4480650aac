"""LRB-WREL stage 2: learn the reference bank through the frozen stage-1 teacher.

The teacher (RMSIN + BERT of --resume's 'model' / 'bert_model') is frozen; only the bank learns: one
[20, D] block of prompt embeddings per train ref of the mask data root, placed in the padding slots of
its class-name tokens. As the original command:

    torchrun --nproc_per_node=4 train_stu_base.py --dataset rrsisd --model_id RMSIN \
        --refer_data_root splits/rrsisd-90-mask --epochs 40 --img_size 480 --lr 1e-5 \
        --resume checkpoints/model_epoch_15.pth --ck_bert BERT_DIR --bert_tokenizer BERT_DIR

After each epoch, teacher + bank are evaluated on the weak train refs (every sentence, no occlusion
boxes); the best bank (oIoU) goes to `caption_embeddings_<model_id>.pt`, the original's format.
`model_last_<model_id>.pth` holds the bank, its optimizer and schedule, the teacher (its BatchNorm
statistics move: RMSIN runs in train mode, as the original) and the RNG states, so `--resume` of that
file continues an interrupted stage 2 exactly.
"""
import logging
import os

import utils
from lib.model.build import build_model
from lib.training.checkpoint import (
    check_checkpoint_space, load_model_and_bert, restore_training_state, save_checkpoint, training_checkpoint)
from lib.training.data import build_data
from lib.training.cuda_graphs import build_update
from lib.training.engine import fit
from lib.training.launch import end_epoch, launch
from lib.training.losses import build_criterion
from lib.training.lrb.bank import (
    N_PROMPT, ReferenceBank, bank_path, build_bank_optimizer, check_bank_in_sync, weak_ref_ids)
from lib.training.lrb.stages import Stage2Bank, bank_predict_fn, open_stage_run, stage_file_names, validate_stage_args
from lib.training.optim import build_poly_scheduler
from lib.training.step import compile_step
from lib.training.summary import make_writer
from lib.training.wrap import wrap_for_distributed

logger = logging.getLogger('lrb')

STAGE = 2


def main(argv=None):
    return launch(run, argv, validate=validate_args)


def validate_args(args):
    return validate_stage_args(args, STAGE)


def run(args, env, batch_size):
    checkpoint, resuming = open_stage_run(args, env, batch_size, STAGE)
    train_set, _, train_loader, val_loader = build_data(args, env, batch_size, val_split='train')
    weak = weak_ref_ids(train_set)
    if not weak:
        raise utils.InputError(f'--refer_data_root {args.refer_data_root}: no weak (class-name) train refs; '
                               f'stage 2 needs the mask data root of mask_train_only.py (<dataset>-XX-mask)')
    if len(weak) < len(train_set):
        logger.warning(f'{len(train_set) - len(weak)} of the {len(train_set)} train refs have accurate '
                       f'expressions; the bank learns rows for all of them, as the original (the mask data '
                       f'root holds weak refs only)')

    model, bert = build_model(args, pretrained='', checkpoint=checkpoint)
    load_model_and_bert(checkpoint, model, bert, key='model', source=args.resume)
    for p in list(model.parameters()) + list(bert.parameters()):
        p.requires_grad_(False)
    if resuming:
        bank = ReferenceBank.from_state(checkpoint.get('caption_bank'), f'--resume {args.resume}')
    else:
        bank = ReferenceBank(train_set.ref_ids, N_PROMPT, bert.config.hidden_size)
    bank.check_dim(bert.config.hidden_size, f'--resume {args.resume}')
    bank.check_covers(train_set, f'--resume {args.resume}')
    model.to(env.device)
    bert.to(env.device)
    bank.to(env.device).broadcast_()
    model = wrap_for_distributed(model, env)  # SyncBatchNorm on GPUs: its statistics move, as the original
    logger.info(f'teacher {args.resume} frozen; bank of {len(bank)} refs x {bank.n_prompt} x {bank.dim} '
                f'({bank.embedding.numel() * 4 / 2 ** 20:.1f} MiB)')

    optimizer = build_bank_optimizer(bank, args.lr, args)
    lr_scheduler = build_poly_scheduler(optimizer, len(train_loader) * args.epochs)
    start_epoch, best = 0, {'oIoU': -0.1}
    if resuming:
        start_epoch, best['oIoU'] = restore_training_state(checkpoint, optimizer, lr_scheduler, args.resume)
        logger.info(f'resumed stage 2 from {args.resume}: continuing at epoch {start_epoch}')
    del checkpoint
    stop_epoch = end_epoch(args, start_epoch)
    if stop_epoch is None:
        return

    # --compile: bank fill + frozen teacher + loss as one graph (and its backward to the bank); evaluation
    # stays eager
    stage = compile_step(Stage2Bank(model, bert, bank, build_criterion().to(env.device)), args, env.distributed)

    def set_modes(training):
        model.train(training)  # drop-path and BatchNorm statistics active while the bank learns
        bert.eval()

    def save(epoch, summary, improved, best):
        state = training_checkpoint(model, bert, optimizer, lr_scheduler, epoch, args, best['oIoU'],
                                    caption_bank=bank.state(), lrb_stage=STAGE)
        last = os.path.join(args.output_dir, f'model_last_{args.model_id}.pth')
        save_checkpoint(state, last)
        if 'oIoU' in improved:
            bank.save(bank_path(args.output_dir, args.model_id))
        logger.info(f'saved {last}' + (f' and the best bank {bank_path(args.output_dir, args.model_id)}'
                                       if 'oIoU' in improved else ''))

    check_checkpoint_space(args.output_dir, (model, bert, bank), optimizer,
                                  replaces=stage_file_names(STAGE, args.model_id))
    writer = make_writer(args.output_dir, args.model_id, fresh=args.overwrite)
    fit(train_step=stage, update=build_update(stage, optimizer, args, env.device),
        predict=bank_predict_fn(model, bert, bank, args.amp),
        train_loader=train_loader, val_loader=val_loader, optimizer=optimizer, lr_scheduler=lr_scheduler,
        start_epoch=start_epoch, epochs=stop_epoch, best=best, device=env.device, save=save,
        print_freq=args.print_freq, amp=args.amp, writer=writer, set_modes=set_modes,
        after_backward=stage.after_backward, on_epoch_start=lambda e: check_bank_in_sync(bank),
        val_desc='Weak train')
    check_bank_in_sync(bank)
    if writer is not None:
        writer.close()


if __name__ == '__main__':
    utils.run_cli(main)
