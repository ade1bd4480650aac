"""Checkpoint files: atomic writes, safe loading, loading weights into a model, the training state that
makes `--resume` exact, the reference's file names and schedule, and the free-space check before the
first step.

Keys follow the reference (`model`, `bert_model`, `optimizer`, `lr_scheduler`, `epoch`, `args`), so files
move between the two codebases; `best_oiou` and `rng` are this codebase's resume extras.
"""
import argparse
import logging
import os
import shutil

import torch

import utils
from lib.files import atomic_file, check_free_space, format_bytes
from lib.model.pretrained import load_torch_file, strip_prefix
from utils import InputError, unwrap_module as unwrap

from . import distributed

logger = logging.getLogger('lrb')


# keys that differ between library versions without meaning a different architecture
_BENIGN_KEY_SUFFIXES = ('num_batches_tracked', 'position_ids', 'token_type_ids', 'relative_position_index',
                        'attn_mask')


def save_checkpoint(state, path, resumable=True):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed (rank 0 only).
    A failed write (disk full, read-only) is one OutputError naming `path` and the cause, and the
    previous file at `path` stays intact. `resumable`: the Ctrl-C message of utils.run_cli names it
    as the file to --resume from (pass False for files that are not training checkpoints)."""
    if distributed.is_main_process():
        with atomic_file(path) as tmp:
            with open(tmp, 'wb') as f:  # through a Python file, a full disk is an OSError with its cause
                try:
                    torch.save(state, f)
                except RuntimeError as e:  # torch's zip writer wraps the OSError while closing the archive
                    cause = e.__context__
                    while cause is not None and not isinstance(cause, OSError):
                        cause = cause.__context__
                    if cause is None:
                        raise
                    raise cause from None  # atomic_file: one line naming `path` and the cause
    if resumable:
        utils.record_checkpoint(path, state.get('epoch') if isinstance(state, dict) else None)


def copy_atomic(src, dst):
    """Copy a written checkpoint (model_best, model_epoch_N), atomically; errors as save_checkpoint."""
    if distributed.is_main_process():
        with atomic_file(dst) as tmp:
            shutil.copyfile(src, tmp)


def load_checkpoint(path, trust=False, flag='--resume'):
    """Load a checkpoint on CPU: lib.model.pretrained.load_torch_file, the one loader of every torch file a
    script reads (checkpoints, Swin weights, banks) and its one-line errors."""
    return load_torch_file(path, flag, trust=trust)


def check_state_dict(module, state_dict):
    """First key mismatch between module and state_dict as a message, or None."""
    own = module.state_dict()
    for k, v in state_dict.items():
        if k not in own:
            if not k.endswith(_BENIGN_KEY_SUFFIXES):
                return f"unexpected key '{k}' {tuple(v.shape) if hasattr(v, 'shape') else ''}".rstrip()
        elif hasattr(v, 'shape') and tuple(v.shape) != tuple(own[k].shape):
            return f"key '{k}' has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
    for k in own:
        if k not in state_dict and not k.endswith(_BENIGN_KEY_SUFFIXES):
            return f"missing key '{k}'"
    return None


def load_weights(module, state_dict, source='checkpoint', what='model'):
    """Load a state dict (with or without `module.` prefixes) into `module`, or raise an InputError
    naming the first mismatching key: a checkpoint of another architecture fails loudly instead of
    loading half its weights (the reference used strict=False)."""
    module = unwrap(module)
    state_dict = strip_prefix(dict(state_dict))
    problem = check_state_dict(module, state_dict)
    if problem:
        raise InputError(f"{source}: '{what}' does not fit this architecture: {problem} "
                         f"(check --model, --swin_type, --img_size, --window12, --mha, --cross_scale, --ck_bert)")
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


def pick_model_state(checkpoint, key='auto', source='checkpoint'):
    """The visual model's weights: 'model' (train.py), else 'student_model' (stage 3)."""
    if not isinstance(checkpoint, dict):
        raise InputError(f'{source}: not a checkpoint dictionary')
    if key != 'auto':
        if key not in checkpoint:
            raise InputError(f"{source}: no '{key}' entry (has: {', '.join(sorted(checkpoint))})")
        return key, checkpoint[key]
    for k in ('model', 'student_model'):
        if k in checkpoint:
            return k, checkpoint[k]
    raise InputError(f"{source}: no 'model' or 'student_model' entry (has: {', '.join(sorted(checkpoint))})")


def load_model_and_bert(checkpoint, model, bert, key='auto', source='checkpoint'):
    """Weights of a train.py / stage-3 / original checkpoint into model (and the separate BERT)."""
    key, state = pick_model_state(checkpoint, key, source)
    load_weights(model, state, source, key)
    if bert is not None:
        if 'bert_model' not in checkpoint:
            raise InputError(f"{source}: no 'bert_model' entry, so it was not trained with --model lavt "
                             f"(try --model lavt_one)")
        load_weights(bert, checkpoint['bert_model'], source, 'bert_model')
    epoch = checkpoint.get('epoch')
    logger.info(f"weights: '{key}'" + (" and 'bert_model'" if bert is not None else '') + f' loaded from {source}'
                + (f' (epoch {epoch})' if isinstance(epoch, int) else ''))
    return key


def args_to_dict(args):
    return {k: v for k, v in vars(args).items()} if isinstance(args, argparse.Namespace) else dict(args)


def training_checkpoint(model, bert, optimizer, lr_scheduler, epoch, args, best_oiou=None, model_key='model',
                        **extra):
    """Reference keys (model, bert_model, optimizer, lr_scheduler, epoch, args) + resume extras."""
    state = {model_key: unwrap(model).state_dict()}
    if bert is not None:
        state['bert_model'] = unwrap(bert).state_dict()
    # every rank's RNG (a collective: call on all ranks), so a resumed run continues exactly
    state.update(optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(), epoch=epoch,
                 args=args_to_dict(args), best_oiou=best_oiou,
                 rng=distributed.all_gather_objects(distributed.get_rng_state()))
    state.update(extra)
    return state


def restore_training_state(checkpoint, optimizer, lr_scheduler, source='--resume'):
    """Optimizer, schedule and RNG from a checkpoint -> (first epoch to run, best oIoU so far)."""
    for key in ('optimizer', 'lr_scheduler', 'epoch'):
        if key not in checkpoint:
            raise InputError(f"{source}: no '{key}' entry, so training cannot continue from it")
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as e:
        raise InputError(f'{source}: optimizer state does not fit ({e})') from None
    lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    rng = checkpoint.get('rng')
    if isinstance(rng, list) and len(rng) == distributed.get_world_size():
        distributed.set_rng_state(rng[distributed.get_rank()])
    elif rng:
        logger.warning(f'{source}: saved by {len(rng)} processes, resumed by {distributed.get_world_size()}: '
                       f'random streams restart (weights, optimizer and schedule continue)')
    best = checkpoint.get('best_oiou')
    return int(checkpoint['epoch']) + 1, (-0.1 if best is None else float(best))


def checkpoint_paths(output_dir, model_id, epoch):
    """model_last always; model_epoch_<N> at epochs 10, 15, 20, ... (the reference's schedule)."""
    paths = {'last': os.path.join(output_dir, f'model_last_{model_id}.pth'),
             'best': os.path.join(output_dir, f'model_best_{model_id}.pth')}
    if epoch >= 10 and (epoch - 10) % 5 == 0:
        paths['epoch'] = os.path.join(output_dir, f'model_epoch_{epoch}.pth')
    return paths


def save_epoch_checkpoints(state, output_dir, model_id, epoch, is_best):
    """Write model_last (+ model_best when improved, + model_epoch_<N>): one torch.save, then copies.
    model_last records (`best_metrics`) that it is the best epoch, so that a run killed before the copies
    finish gets them back on --resume (restore_best_files)."""
    paths = checkpoint_paths(output_dir, model_id, epoch)
    state['best_metrics'] = ['oIoU'] if is_best else []
    save_checkpoint(state, paths['last'])
    if is_best:
        copy_atomic(paths['last'], paths['best'])
    if 'epoch' in paths:
        copy_atomic(paths['last'], paths['epoch'])
    return paths


def _stored_epoch(path):
    """The 'epoch' of the checkpoint at `path` (tensors memory-mapped, not read); None when there is no
    file, -1 when it cannot be read."""
    if not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            epoch = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('epoch')
        return epoch if isinstance(epoch, int) else -1
    except Exception:  # noqa: BLE001 - damaged or foreign: replaced by the resumed best epoch
        return -1


def restore_best_files(checkpoint, source, best_files, before=None):
    """On --resume: a run killed after writing model_last but before copying it to a best file left that
    file missing (or an earlier epoch's), and the later epochs may never beat it. For each metric the
    resumed checkpoint is the best epoch of (`best_metrics`), copy `source` to its file in `best_files`
    {metric: path} when that holds an earlier epoch or none; `before(metric)`, when given, first writes
    what goes with it (stage 3's best bank). -> the paths restored."""
    epoch, restored = checkpoint.get('epoch'), []
    if not isinstance(epoch, int):
        return restored
    for metric in checkpoint.get('best_metrics') or ():
        path = best_files.get(metric)
        held = _stored_epoch(path) if path else epoch
        if held is not None and held >= epoch:
            continue
        if before is not None:
            before(metric)
        copy_atomic(source, path)
        restored.append(path)
        logger.info(f'restored {path} from {source} (epoch {epoch}, the best {metric} so far): '
                    f'the run that wrote it was stopped before the copy')
    return restored


def restore_stage1_files(checkpoint, source, output_dir, model_id):
    """restore_best_files for train.py, and its model_epoch_<N> of the resumed epoch when missing."""
    epoch = checkpoint.get('epoch')
    paths = checkpoint_paths(output_dir, model_id, epoch) if isinstance(epoch, int) else {}
    restore_best_files(checkpoint, source, {'oIoU': paths['best']} if paths else {})
    if 'epoch' in paths and not os.path.isfile(paths['epoch']):
        copy_atomic(source, paths['epoch'])
        logger.info(f"restored {paths['epoch']} from {source}: the run that wrote it was stopped before the copy")


def run_file_names(model_id, epochs, start_epoch=0):
    """Names of the checkpoints train.py writes in --output-dir over epochs [start_epoch, epochs):
    what lib.files.guard_run_dir must not let a new run replace silently."""
    names = [f'model_last_{model_id}.pth', f'model_best_{model_id}.pth']
    for epoch in range(start_epoch, epochs):
        path = checkpoint_paths('', model_id, epoch).get('epoch')
        if path:
            names.append(os.path.basename(path))
    return names


def estimate_checkpoint_bytes(modules, optimizer=None):
    """Bytes a training checkpoint of `modules` takes: their state dicts plus AdamW's two (amsgrad:
    three) moment tensors per optimized parameter (of one optimizer or a list), plus 1 MB for the rest."""
    total = 1 << 20
    for module in modules:
        if module is not None:
            total += sum(t.numel() * t.element_size() for t in unwrap(module).state_dict().values()
                         if torch.is_tensor(t))
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    for group in (g for opt in optimizers if opt is not None for g in opt.param_groups):
        moments = 3 if group.get('amsgrad') else 2
        total += moments * sum(p.numel() * p.element_size() for p in group['params'])
    return total


def check_checkpoint_space(output_dir, modules, optimizer=None, *, replaces=(), copies=3, flag='--output-dir'):
    """One-line OutputError before the first step when `output_dir` has no room for `copies` checkpoints
    (model_last, model_best and the temporary written before each rename) of this model; the files named
    in `replaces` that are already there count as room. Call it once the optimizer exists (train.py,
    stage scripts). -> the estimated size of one checkpoint."""
    size = estimate_checkpoint_bytes(modules, optimizer)
    if distributed.is_main_process():
        replaced = sum(os.path.getsize(p) for p in (os.path.join(output_dir, n) for n in replaces)
                       if os.path.isfile(p))
        needed = max(size, copies * size - replaced)
        check_free_space(output_dir, needed, flag,
                         f'{copies} checkpoints of about {format_bytes(size)} (last, best and the '
                         f'temporary copy written before each rename)')
    return size


def stage1_saver(make_state, output_dir, model_id):
    """train.py's files: model_last every epoch, model_best when val oIoU improves, model_epoch_<N>."""
    def save(epoch, summary, improved, best):
        paths = save_epoch_checkpoints(make_state(epoch, best['oIoU']), output_dir, model_id, epoch,
                                       'oIoU' in improved)
        logger.info(f"saved {paths['last']}" + (' (best so far)' if 'oIoU' in improved else ''))
    return save
