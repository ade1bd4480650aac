"""Shared command-line parser and the one-line error convention of every entry point.

Every flag of the original LRB-WREL `args.py` is here with its original default, so the
commands of the original README run unchanged. Flags that are new in this codebase are
grouped at the end of `get_parser()`.
"""
import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


class InputError(Exception):
    """Bad user input (path, flag, id). Entry points print it as one line and exit non-zero."""


def run_cli(main, argv=None):
    """Run `main(args_list)` and turn an `InputError` into `prog: error: message` + exit code 2."""
    try:
        return main(argv)
    except InputError as e:
        prog = sys.argv[0].rsplit('/', 1)[-1] or 'lrb-wrel'
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.
    Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}{path.suffix}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
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
    folder is swapped out and removed only after the new one is in place. On failure nothing changes.
    """
    out = Path(out).absolute()
    _check_output_dir(out, overwrite, flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    except OSError as e:
        raise InputError(f'{flag} {out}: cannot write in {out.parent} ({e.strerror})') from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        yield tmp
        if not out.exists() and not out.is_symlink():
            os.replace(tmp, out)
            return
        old = out.with_name(f'.{out.name}.old-{os.getpid()}')
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
    parser.add_argument('--stop_after', default=0, type=int,
                        help='train.py: stop after this many epochs in this run (0: run to --epochs); '
                             'continue later with --resume, e.g. under a job time limit')
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
