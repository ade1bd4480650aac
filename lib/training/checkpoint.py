"""Checkpoint files: atomic writes, safe loading, loading weights into a model, the training state that
makes `--resume` exact, the reference's file names and schedule, and the free-space check before the
first step.

Keys follow the reference (`model`, `bert_model`, `optimizer`, `lr_scheduler`, `epoch`, `args`), so files
move between the two codebases; `best_oiou` and `rng` are this codebase's resume extras.
"""
import argparse
import logging
import os
import pickle
import re
import shutil

import torch

import utils
from lib.files import atomic_file, check_free_space, format_bytes
from lib.model.pretrained import strip_prefix
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


_TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'  # pickled magic number of torch < 1.6 files


def _looks_like_torch_file(path):
    """The zip archive torch.save writes (perhaps truncated) or a legacy torch file."""
    with open(path, 'rb') as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    return head.startswith(b'PK\x03\x04') or head == _TORCH_LEGACY_MAGIC


def _first_line(exc):
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # torch's weights-only errors put the cause on a later line
        if ln.startswith('WeightsUnpickler error:'):
            return ln[len('WeightsUnpickler error:'):].strip()
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path, trust=False, flag='--resume'):
    """Load a checkpoint on CPU. Tensors and plain containers only (weights_only), with
    argparse.Namespace allowed because the reference stores its args that way; `trust=True` allows
    arbitrary pickles (only for files you made). One-line errors: missing, a directory, not a torch
    file, truncated, or naming the global the restricted loader refused."""
    utils.check_input_file(path, flag)
    try:
        if not _looks_like_torch_file(path):
            raise InputError(f'{flag} {path}: not a torch checkpoint (neither the zip archive of torch.save '
                             f'nor a legacy torch file)')
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r'GLOBAL ([\w.]+)', str(e))
        if not trust and refused:
            raise InputError(f"{flag} {path}: refused to unpickle the global '{refused.group(1)}' (by default "
                             f"only tensors and plain containers load); add --trust_checkpoint if you trust this "
                             f"file") from None
        if not trust and 'Weights only load failed' in str(e):
            raise InputError(f'{flag} {path}: refused to unpickle ({_first_line(e)}); '
                             f'add --trust_checkpoint if you trust this file') from None
        raise InputError(f'{flag} {path}: not a torch checkpoint ({_first_line(e)})') from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise InputError(f'{flag} {path}: not a readable torch checkpoint, perhaps truncated or damaged '
                         f'({type(e).__name__}: {_first_line(e)})') from None


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
    """Write model_last (+ model_best when improved, + model_epoch_<N>): one torch.save, then copies."""
    paths = checkpoint_paths(output_dir, model_id, epoch)
    save_checkpoint(state, paths['last'])
    if is_best:
        copy_atomic(paths['last'], paths['best'])
    if 'epoch' in paths:
        copy_atomic(paths['last'], paths['epoch'])
    return paths


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
