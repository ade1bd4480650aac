"""Shared command-line parser and the reliability conventions of every entry point.

Every flag of the original LRB-WREL `args.py` is here with its original default, so the
commands of the original README run unchanged. Flags that are new in this codebase are
grouped at the end of `get_parser()`.

What each entry point (train.py, test.py, mask_train_only.py, the stage scripts) gets from here:
- `run_cli(main)`: an `InputError` / `OutputError` (also one raised inside a DataLoader worker) is one
  line and exit 2; Ctrl-C is one line naming the last checkpoint (exit 130).
- checks to run at the start of `main`, before anything slow: `check_flag_values`, `check_input_file`,
  `guard_run_dir` (training output folders), `guard_output_file` (single result files),
  `check_writable_dir`, `check_free_space`.
- writes: `atomic_file`, `atomic_output_dir` (temporaries named by `temp_path`, so
  `remove_stale_temporaries` can clean what a killed run left, and nothing else).
"""
import argparse
import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

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


def record_checkpoint(path, epoch=None):
    """Remember the last resumable checkpoint written (engine.save_checkpoint calls this after each
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


# dest -> (flag as the user types it, test, what it must be)
FLAG_RULES = {
    'lr': ('--lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    'caption_lr': ('--caption_lr', lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    'weight_decay': ('--wd', lambda v: _finite(v) and v >= 0, 'a finite number >= 0'),
    'fusion_drop': ('--fusion_drop', lambda v: _finite(v) and 0 <= v < 1, 'in [0, 1)'),
    'epochs': ('--epochs', lambda v: v >= 1, '>= 1'),
    'batch_size': ('--batch-size', lambda v: v >= 1, '>= 1'),
    'workers': ('--workers', lambda v: v >= 0, '>= 0'),
    'print_freq': ('--print-freq', lambda v: v >= 1, '>= 1'),
    'img_size': ('--img_size', lambda v: v >= 32 and v % 32 == 0, 'a positive multiple of 32'),
    'stop_after': ('--stop_after', lambda v: v >= 0, '>= 0'),
    'vis_num': ('--vis_num', lambda v: v >= 0, '>= 0'),
    'caption_inner_steps': ('--caption_inner_steps', lambda v: v >= 1, '>= 1'),
    'caption_update_every': ('--caption_update_every', lambda v: v >= 1, '>= 1'),
}


def check_flag_values(args, names=None):
    """One-line InputError for the first flag of `names` (dests; default: every rule in FLAG_RULES
    that `args` has) whose value is out of range, e.g. `--lr nan: must be a finite number > 0`.
    Call it first thing in main() of every script that uses get_parser()."""
    for name in (names if names is not None else FLAG_RULES):
        if not hasattr(args, name):
            continue
        flag, ok, what = FLAG_RULES[name]
        value = getattr(args, name)
        if not ok(value):
            raise InputError(f'{flag} {value}: must be {what}')


def check_input_file(path, flag):
    """A file the script reads (--resume, weights): one line if it is missing or a directory."""
    if not path:
        raise InputError(f'{flag}: no file given')
    if os.path.isdir(path):
        raise InputError(f'{flag} {path}: is a directory, not a file')
    if not os.path.isfile(path):
        raise InputError(f'{flag} {path}: file not found')


# --- output folders -------------------------------------------------------------------------------

_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
# .<name>.tmp<pid>-<host><suffix> (atomic_file; older versions: no -<host>),
# .<name>.tmp-<pid>-<host>-<random> and .<name>.old-<pid>-<host> (atomic_output_dir),
# .lrb-probe-<pid>-<host>-<random> (check_writable_dir)
_TEMP_FILE = re.compile(r'^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{6}))?(?P<suffix>\.[^.]*)?$')
_TEMP_DIR = re.compile(r'^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})(?:-[\w]+)?$')
_PROBE = re.compile(r'^\.lrb-probe-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-\w+$')


def temp_path(path):
    """The temporary name `atomic_file` writes `path` under: hidden, in the same folder, tagged with
    this process and host, same suffix (writers that go by the suffix pick the right format)."""
    path = Path(path)
    return path.with_name(f'.{path.name}.tmp{os.getpid()}-{_HOST_TAG}{path.suffix}')


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stale(match):
    """A temporary of ours whose process is gone (on this host; other hosts' are left alone)."""
    host = match.groupdict().get('host')
    return (host is None or host == _HOST_TAG) and not _pid_alive(int(match.group('pid')))


def remove_stale_temporaries(folder):
    """Delete what killed runs of this code left in `folder`: temporaries named by `temp_path`,
    `atomic_output_dir` and `check_writable_dir` whose process no longer runs (and only those).
    A half-swapped output folder (killed between its two renames) is put back instead.
    Called by `guard_run_dir` and `atomic_output_dir`; returns the names removed."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        name = entry.name
        if not name.startswith('.'):
            continue
        try:
            m = _TEMP_FILE.match(name)
            if m and entry.is_file(follow_symlinks=False) and (m.group('suffix') or '') == Path(
                    m.group('name')).suffix and _stale(m):
                os.unlink(entry.path)
                removed.append(name)
                continue
            m = _PROBE.match(name)
            if m and entry.is_file(follow_symlinks=False) and _stale(m):
                os.unlink(entry.path)
                removed.append(name)
                continue
            m = _TEMP_DIR.match(name)
            if m and entry.is_dir(follow_symlinks=False) and _stale(m):
                final = folder / m.group('name')
                if m.group('kind') == 'old' and not os.path.lexists(final):
                    os.replace(entry.path, final)  # the previous output, never replaced: restore it
                    logger.warning(f'restored {final} from {name}, left by an interrupted run')
                    continue
                shutil.rmtree(entry.path)
                removed.append(name)
        except FileNotFoundError:
            continue  # another process cleaned it first
    if removed:
        logger.warning(f"removed {len(removed)} temporary file(s) left by killed runs in {folder}: "
                       f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return removed


def _existing_ancestor(path):
    path = Path(path).absolute()
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_writable_dir(path, flag):
    """One-line InputError unless `path` is (or can be created as) a folder this process can write in.
    Creates nothing that stays: a probe file in the nearest existing folder is made and removed."""
    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        what = 'is a file' if base == path.absolute() else f'lies under {base}, which is a file'
        raise InputError(f'{flag} {path}: {what}, not a folder')
    try:
        fd, probe = tempfile.mkstemp(prefix=f'.lrb-probe-{os.getpid()}-{_HOST_TAG}-', dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f'{flag} {path}: cannot write in {base} ({e.strerror or e})') from None
    return base


def format_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000


def free_bytes(path):
    """Free space on the file system that holds `path` (or would, once created)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def check_free_space(path, needed, flag, what):
    """One-line OutputError when the file system of `path` has less than `needed` bytes free;
    `what` says what the bytes are for (e.g. '3 checkpoints of about 1.2 GB')."""
    free = free_bytes(path)
    if free < needed:
        raise OutputError(f'{flag} {path}: only {format_bytes(free)} free, {what} need about '
                          f'{format_bytes(needed)}; free some space or choose another {flag}')
    return free


def _existing_outputs(out, file_names):
    found = []
    if out.is_dir():
        for name in file_names:
            if any(c in name for c in '*?['):
                found += sorted(p.name for p in out.glob(name))
            elif os.path.lexists(out / name):
                found.append(name)
    return found


def guard_output_dir(output_dir, file_names, *, overwrite=False, flag, overwrite_flag='--overwrite'):
    """Before a script writes `file_names` (names or glob patterns) into `output_dir`: refuse (one line)
    when it is a file, cannot be written, or already holds any of them, unless `overwrite`; then remove
    stale temporaries of killed runs. Creates nothing. (test.py's --vis_dir; for training runs use
    guard_run_dir.)"""
    out = Path(output_dir)
    check_writable_dir(out, flag)
    existing = [] if overwrite else _existing_outputs(out, file_names)
    if existing:
        more = f' and {len(existing) - 1} more' if len(existing) > 1 else ''
        raise InputError(f'{flag} {out}: holds {existing[0]}{more} from an earlier run; pass {overwrite_flag} '
                         f'to replace them')
    if int(os.environ.get('RANK', '0') or 0) == 0:
        remove_stale_temporaries(out)


def guard_run_dir(output_dir, file_names, *, resume='', overwrite=False, dir_flag='--output-dir',
                  resume_flag='--resume', overwrite_flag='--overwrite', resume_hint=None):
    """Before a training run writes into `output_dir`: refuse (one line) when it is a file or cannot be
    written, or when it already holds any of `file_names` (the files this run would write: a finished
    run's checkpoints; glob patterns allowed) unless the user asked to continue (`resume`: the path given
    to continue from) or to replace (`overwrite`); the message names both flags (`resume_hint`: the file
    to suggest). Then removes stale temporaries of killed runs (rank 0). Creates nothing.
    Call it at the start of every training script, e.g. with `engine.run_file_names(...)`; it also
    arms the Ctrl-C message of `run_cli`. A script whose --resume is not a continuation (the stage
    scripts' teacher) passes resume='' and resume_flag=None: then only `overwrite_flag` is offered."""
    out = Path(output_dir)
    check_writable_dir(out, dir_flag)
    existing = [] if (resume or overwrite) else _existing_outputs(out, file_names)
    if existing:
        more = f' and {len(existing) - 1} more' if len(existing) > 1 else ''
        hint = shlex.quote(str(out / (resume_hint if resume_hint and (out / resume_hint).is_file() else existing[0])))
        resume_part = f'{resume_flag} {hint} to continue it or ' if resume_flag else ''
        raise InputError(f'{dir_flag} {out}: holds {existing[0]}{more} of a finished run; pass '
                         f'{resume_part}{overwrite_flag} to replace it')
    _RUN.update(dir=str(out), resume=os.path.abspath(resume) if resume else None, resume_flag=resume_flag)
    if int(os.environ.get('RANK', '0') or 0) == 0:
        remove_stale_temporaries(out)


def guard_output_file(path, *, overwrite=False, flag, overwrite_flag='--overwrite'):
    """Before a script writes one result file (test.py's metrics JSON): refuse (one line) when it exists
    (unless `overwrite`), is a folder, or its folder cannot be written; stale temporaries go."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f'{flag} {path}: is a directory, not a file')
    if os.path.lexists(path) and not overwrite:
        raise InputError(f'{flag} {path}: exists; pass {overwrite_flag} to replace it')
    check_writable_dir(path.parent, flag)
    remove_stale_temporaries(path.parent)


# --- atomic writes --------------------------------------------------------------------------------

def write_error(path, exc, tmp=None):
    """OutputError 'cannot write PATH: cause' for an OSError met while writing `path`."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    other = getattr(exc, 'filename', None)
    extra = f" ('{other}')" if other and str(other) not in (str(path), str(tmp)) else ''
    if exc.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            extra += f', {format_bytes(free_bytes(path))} free'
    return OutputError(f"cannot write '{path}': {cause}{extra}")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` (see `temp_path`); on success it is flushed to disk and
    renamed onto `path`, on failure removed. Readers never see a half-written file; an OSError while
    writing becomes an OutputError naming `path` and the cause (`No space left on device`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, tmp) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_output_dir(out, overwrite, flag):
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{flag} {out}: is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out, overwrite=False, flag='--out'):
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` in one rename.

    A non-empty `out` is refused (one-line InputError naming `flag`) unless `overwrite`; then the old
    folder is swapped out and removed only after the new one is in place. On failure nothing changes;
    an OSError while writing is one OutputError naming the file and the cause. Temporaries that a
    killed run left beside `out` are removed first (see `remove_stale_temporaries`).
    """
    out = Path(out).absolute()
    _check_output_dir(out, overwrite, flag)
    check_writable_dir(out.parent, flag)
    remove_stale_temporaries(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-{os.getpid()}-{_HOST_TAG}-', dir=out.parent))
    except OSError as e:
        raise InputError(f'{flag} {out}: cannot write in {out.parent} ({e.strerror})') from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        try:
            yield tmp
        except OSError as e:
            name = str(e.filename or '')
            shown = out / os.path.relpath(name, tmp) if name.startswith(str(tmp)) else (name or out)
            raise OutputError(f"{flag} {out}: cannot write '{shown}': {e.strerror or e}") from None
        if not out.exists() and not out.is_symlink():
            os.replace(tmp, out)
            return
        old = out.with_name(f'.{out.name}.old-{os.getpid()}-{_HOST_TAG}')
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        if old.is_symlink():  # `out` was a link to a folder: drop the link, keep what it pointed to
            old.unlink()
        else:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    parser.add_argument('-j', '--workers', default=8, type=int, metavar='N',
                        help='data loading workers (split across processes)')
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
                        help='torch.compile the training forward/backward (default backend inductor; the first '
                             'steps are slow while it compiles); evaluation stays eager')
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
