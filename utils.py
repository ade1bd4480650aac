"""What every entry point shares at the command line: the parser and the one-line-error convention.

Every flag of the original LRB-WREL `args.py` is here with its original default, so the
commands of the original README run unchanged. Flags that are new in this codebase are
grouped at the end of `get_parser()`.

What each entry point (train.py, test.py, mask_train_only.py, the stage scripts) gets from here:
- `run_cli(main)`: an `InputError` / `OutputError` (also one raised inside a DataLoader worker) is one
  line and exit 2; Ctrl-C is one line naming the last checkpoint (exit 130), SIGTERM the same (exit 143).
- checks to run at the start of `main`, before anything slow: `check_flag_values`, `check_input_file`.
  The output side (run-folder guard, atomic writes, free space) is lib/files.py.
- `unwrap_module`: the plain module inside DDP / torch.compile wrappers (every layer needs it, bert/ too).
"""
import argparse
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading

logger = logging.getLogger('lrb')


class InputError(Exception):
    """Bad user input (path, flag, id). Entry points print it as one line and exit non-zero.

    Raised inside a DataLoader worker, it comes back wrapped in the worker's traceback; the
    constructor recovers the original one-line message, so `--workers N` reads like `--workers 0`."""

    def __init__(self, message=''):
        super().__init__(_unwrap_worker_message(str(message)))


class OutputError(InputError):
    """A file or folder could not be written (disk full, read-only, a file in the way): one line
    naming the path and the cause. A subclass of InputError, so every handler treats it alike."""


_WORKER_LAST_LINE = re.compile(r'^(?:[\w.]+\.)?(?:InputError|OutputError): (.*)', re.M | re.S)


def _unwrap_worker_message(message):
    """'Caught InputError in DataLoader worker process 0.\nOriginal Traceback ...\nutils.InputError: m' -> 'm'."""
    if not message.startswith('Caught ') or '\nOriginal Traceback' not in message:
        return message
    matches = list(_WORKER_LAST_LINE.finditer(message))
    return matches[-1].group(1).strip() if matches else message


def _worker_death_message(exc):
    """One line for a DataLoader worker killed by the system (usually out of memory), else None."""
    text = str(exc)
    if not text.startswith('DataLoader worker'):
        return None
    return (f'{text.splitlines()[0].rstrip(". ")}: a data-loading worker died, usually for lack of '
            f'memory; lower --workers or --batch-size')


def unwrap_module(module):
    """The plain module inside torch.compile and DDP wrappers (in either order)."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, '_orig_mod', None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


# --- Ctrl-C: where the last checkpoint is -------------------------------------------------------

_RUN = {'dir': None, 'resume': None, 'last': None, 'epoch': None, 'resume_flag': '--resume'}


def record_run(run_dir, resume='', resume_flag='--resume'):
    """Remember the training run's folder and what it continues from (lib.files.guard_run_dir calls this),
    so that Ctrl-C can say whether anything can be resumed."""
    _RUN.update(dir=str(run_dir), resume=os.path.abspath(resume) if resume else None, resume_flag=resume_flag)


def record_checkpoint(path, epoch=None):
    """Remember the last resumable checkpoint written (lib.training.checkpoint.save_checkpoint calls this after each
    successful write), so that Ctrl-C can say where it is and how to resume."""
    _RUN['last'], _RUN['epoch'] = os.path.abspath(path), epoch


def _interrupted_message(what='interrupted'):
    flag = _RUN['resume_flag']
    if _RUN['last']:
        epoch = f" (epoch {_RUN['epoch']})" if _RUN['epoch'] is not None else ''
        hint = f"; continue with {flag} {shlex.quote(_RUN['last'])}" if flag else ''
        return f"{what}; the last checkpoint is {_RUN['last']}{epoch}{hint}"
    if _RUN['resume'] and flag:
        return (f"{what} before this run wrote a checkpoint; continue again with "
                f"{flag} {shlex.quote(_RUN['resume'])}")
    if _RUN['dir']:
        return f"{what} before the first checkpoint; nothing to resume in {_RUN['dir']}"
    return what


def run_cli(main, argv=None):
    """Run `main(argv)` as an entry point (the `if __name__ == '__main__'` line of every script):
    InputError / OutputError -> `prog: error: message` + exit 2; Ctrl-C -> one line saying where the
    last checkpoint is + exit 130; SIGTERM (a job scheduler's time limit or `scancel`) -> the same line +
    exit 143; a DataLoader worker killed by the system -> one line + exit 1."""
    prog = sys.argv[0].rsplit('/', 1)[-1] or 'lrb-wrel'

    def on_signal(signum, frame):
        # exit from the handler itself: Python's own KeyboardInterrupt can land inside a callback (the
        # logging lock's at-fork hook when DataLoader workers start), where it is printed and dropped;
        # an interrupted checkpoint write leaves only a temporary file, cleaned at the next start
        what = 'interrupted' if signum == signal.SIGINT else f'terminated ({signal.Signals(signum).name})'
        print(f'\n{prog}: {_interrupted_message(what)}', file=sys.stderr, flush=True)
        os._exit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if in_main_thread else {}
    try:
        return main(argv)
    except InputError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'\n{prog}: {_interrupted_message()}', file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        message = _worker_death_message(e)
        if message is None:
            raise
        print(f'{prog}: error: {message}', file=sys.stderr)
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


# --- flag values ----------------------------------------------------------------------------------

def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def _plain_file_name(v):
    """A model id goes into file and folder names (model_last_<id>.pth, tb_<id>): one path component."""
    return (isinstance(v, str) and 0 < len(v) <= 200 and not v.startswith('.') and v.isprintable()
            and '/' not in v and '\\' not in v)


MAX_EPOCHS = 10000  # the papers train 40

# dest -> (flag as the user types it, test, what it must be)
FLAG_RULES = {
    'lr': ('--lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    'caption_lr': ('--caption_lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    'weight_decay': ('--wd', lambda v: _finite(v) and v >= 0, 'a finite number >= 0'),
    'fusion_drop': ('--fusion_drop', lambda v: _finite(v) and 0 <= v < 1, 'in [0, 1)'),
    # bounded: stage 3 plans its bank schedule epoch by epoch before the first step (--epochs 10**12 would hang)
    'epochs': ('--epochs', lambda v: 1 <= v <= MAX_EPOCHS, f'between 1 and {MAX_EPOCHS}'),
    'batch_size': ('--batch-size', lambda v: v >= 1, '>= 1'),
    'workers': ('--workers', lambda v: v == 'auto' or v >= 0, ">= 0 or 'auto'"),
    'print_freq': ('--print-freq', lambda v: v >= 1, '>= 1'),
    'img_size': ('--img_size', lambda v: v >= 32 and v % 32 == 0, 'a positive multiple of 32'),
    'stop_after': ('--stop_after', lambda v: v >= 0, '>= 0'),
    'vis_num': ('--vis_num', lambda v: v >= 0, '>= 0'),
    'caption_inner_steps': ('--caption_inner_steps', lambda v: v >= 1, '>= 1'),
    'caption_update_every': ('--caption_update_every', lambda v: v >= 1, '>= 1'),
    'seed': ('--seed', lambda v: 0 <= v < 2 ** 32, 'in [0, 2**32)'),  # torch / numpy refuse larger seeds
    'model_id': ('--model_id', _plain_file_name, 'a plain file name (not empty, no / or \\, no leading dot, '
                                                 'printable, <= 200 characters)'),
}
ALWAYS_CHECKED = ('model_id',)  # checked by every check_flag_values call: it names files (checkpoints, logs)


def check_flag_values(args, names=None):
    """One-line InputError for the first flag of `names` (dests; default: every rule in FLAG_RULES
    that `args` has; ALWAYS_CHECKED in every call) whose value is out of range, e.g. `--lr nan: must be a
    finite number > 0`. Call it first thing in main() of every script that uses get_parser()."""
    for name in ALWAYS_CHECKED + tuple(names if names is not None else FLAG_RULES):
        if not hasattr(args, name):
            continue
        flag, ok, what = FLAG_RULES[name]
        value = getattr(args, name)
        if not ok(value):
            shown = (shlex.quote(value) if value.isprintable() else repr(value)) if isinstance(value, str) else value
            raise InputError(f'{flag} {shown}: must be {what}')


def check_input_file(path, flag, hint=''):
    """A file the script reads (--resume, weights): one line if it is missing or a directory; `hint` (what to
    do instead) goes in parentheses after it."""
    more = f' ({hint})' if hint else ''
    if not path:
        raise InputError(f'{flag}: no file given{more}')
    if os.path.isdir(path):
        raise InputError(f'{flag} {path}: is a directory, not a file{more}')
    if not os.path.isfile(path):
        raise InputError(f'{flag} {path}: file not found{more}')


def worker_count(text):
    """--workers: 'auto' or an integer (argparse type; the range is FLAG_RULES')."""
    return text if text == 'auto' else int(text)


worker_count.__name__ = 'integer or auto'  # argparse's message: "invalid integer or auto value: 'x'"


def get_parser():
    parser = argparse.ArgumentParser(description='RMSIN / LRB-WREL training and testing')
    # --- flags of the original code, original defaults -------------------------------------
    parser.add_argument('--amsgrad', action='store_true',
                        help='set amsgrad=True in AdamW')
    parser.add_argument('-b', '--batch-size', default=8, type=int,
                        help='global batch size, split evenly across processes')
    parser.add_argument('--bert_tokenizer', default='bert-base-uncased',
                        help='BERT tokenizer: a local directory or a hub name')
    parser.add_argument('--ck_bert', default='bert-base-uncased',
                        help='pre-trained BERT weights: a local directory or a hub name')
    parser.add_argument('--dataset', default='rrsisd', help='rrsisd or res_lad (RIS-LAD)')
    parser.add_argument('--ddp_trained_weights', action='store_true',
                        help='accepted for compatibility; `module.` prefixes are detected automatically')
    parser.add_argument('--device', default='cuda:0', help='device for single-process runs (cpu, cuda, cuda:N)')
    parser.add_argument('--epochs', default=40, type=int, metavar='N', help='number of total epochs to run')
    parser.add_argument('--fusion_drop', default=0.0, type=float, help='dropout rate for PWAMs')
    parser.add_argument('--img_size', default=480, type=int, help='input image size (a multiple of 32)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='set by older launchers; torchrun uses the LOCAL_RANK variable')
    parser.add_argument('--lr', default=0.00003, type=float, help='the initial learning rate')
    parser.add_argument('--caption_lr', default=3e-5, type=float,
                        help='learning rate of the learnable reference bank')
    parser.add_argument('--mha', default='',
                        help='PWAM heads per stage as a-b-c-d, e.g. 4-4-4-4 (default 1-1-1-1)')
    parser.add_argument('--model', default='lavt', choices=['lavt', 'lavt_one'],
                        help='lavt: separate BERT; lavt_one: BERT inside the model')
    parser.add_argument('--model_id', default='RMSIN', help='name to identify the model in checkpoint names')
    parser.add_argument('--output-dir', default='./checkpoints/', help='where checkpoints and logs go')
    parser.add_argument('--pin_mem', action='store_true', help='pin memory in the data loaders')
    parser.add_argument('--pretrained_swin_weights',
                        default='./pretrained_weights/swin_base_patch4_window12_384_22k.pth',
                        help='official Swin weights ({"model": state_dict}); empty string = random init')
    parser.add_argument('--caption_embedding_path', default='',
                        help='learnable reference bank file written by stage 2')
    parser.add_argument('--print-freq', default=10, type=int, help='log every N iterations')
    parser.add_argument('--refer_data_root', default='./refer/data/', help='REFER dataset root directory')
    parser.add_argument('--resume', default='', help='checkpoint to resume from / to test')
    parser.add_argument('--split', default='test', help='split to evaluate (test.py)')
    parser.add_argument('--splitBy', default='unc', help='refs file suffix: refs(<splitBy>).p')
    parser.add_argument('--swin_type', default='base',
                        help='nano, tiny, small, base or large Swin Transformer')
    parser.add_argument('--wd', '--weight-decay', default=1e-2, type=float, metavar='W',
                        help='weight decay', dest='weight_decay')
    parser.add_argument('--window12', action='store_true',
                        help='window size 12 (otherwise inferred from the Swin weights file name, else 7)')
    parser.add_argument('-j', '--workers', default='auto', type=worker_count, metavar='N|auto',
                        help='data-loading workers: N in all, split across processes (as the reference), or '
                             'auto (default): per process, the CPUs it has minus one, at most 8. The data '
                             'drawn do not depend on it')
    parser.add_argument('--caption_inner_steps', default=1, type=int,
                        help='reference-bank inner steps per student step (stage 3)')
    parser.add_argument('--caption_update_every', default=1, type=int,
                        help='run the reference-bank inner loop every N student steps (stage 3)')
    parser.add_argument('--start_epoch', default=1, type=int, help='kept for compatibility')
    parser.add_argument('--bank_refresh_every', default=1, type=int, help='kept for compatibility')
    parser.add_argument('--bank_refresh_epochs', default=1, type=int, help='kept for compatibility')
    parser.add_argument('--bank_refresh_start', default=1, type=int, help='kept for compatibility')
    parser.add_argument('--bank_refresh_lr', default=1e-6, type=float, help='kept for compatibility')
    # --- flags new in this codebase ---------------------------------------------------------
    parser.add_argument('--seed', default=2401, type=int, help='random seed (data order, init, augmentation)')
    parser.add_argument('--cross_scale', default='faithful', choices=['faithful', 'msda'],
                        help='cross-scale interaction: the reference module or multi-scale deformable attention')
    parser.add_argument('--random_boxes', default=True, action=argparse.BooleanOptionalAction,
                        help='black out 20-60 random 32-px boxes on a fixed 20%% of training samples '
                             '(as the reference)')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast on GPU')
    # speed / memory options: off by default; none changes the math beyond rounding (bench/compare_original.py)
    parser.add_argument('--compile', nargs='?', const='inductor', default='', metavar='BACKEND',
                        help='torch.compile each training step (text encoder, bank fill, RMSIN and loss) as one '
                             'graph (default backend inductor; the first steps are slow while it compiles); '
                             'evaluation stays eager')
    parser.add_argument('--cuda_graphs', action='store_true',
                        help='capture the whole training update (forward, backward, optimizer step) once as a '
                             'CUDA graph and replay it (one process on a GPU; after 3 eager iterations)')
    parser.add_argument('--fused_adamw', action='store_true', help="AdamW's fused kernel (CUDA and CPU)")
    parser.add_argument('--channels_last', action='store_true',
                        help="channels-last (NHWC) memory for the decoder's convolutions")
    parser.add_argument('--checkpoint_activations', action='store_true',
                        help='recompute each Swin block in the backward pass instead of storing its '
                             'activations (the reference\'s use_checkpoint): less memory, more compute')
    parser.add_argument('--stop_after', default=0, type=int,
                        help='train.py: stop after this many epochs in this run (0: run to --epochs); '
                             'continue later with --resume, e.g. under a job time limit')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the files of a finished run with the same --model_id in --output-dir '
                             '(train), or an existing metrics file / overlays (test.py); without it they are '
                             'refused')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow arbitrary pickled objects in --resume (only for files you trust)')
    parser.add_argument('--weights_key', default='auto',
                        choices=['auto', 'model', 'student_model', 'teacher_model'],
                        help="test.py: checkpoint entry with the model weights (auto: 'model', else "
                             "'student_model')")
    parser.add_argument('--results_json', default='',
                        help='test.py: metrics file (default: next to the checkpoint)')
    parser.add_argument('--vis_dir', default='', help='test.py: save PNG overlays of predictions here')
    parser.add_argument('--vis_num', default=20, type=int, help='test.py: how many samples --vis_dir shows')
    return parser
