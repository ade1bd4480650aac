"""Reproduce the paper's comparison: Only Accurate, Naive-WREL and LRB-WREL per accurate-expression share,
as one table (Markdown + JSON) and one qualitative figure (PNG).

    python reproduce.py --refer_data_root DATA --dataset rrsisd --ratios 10 30 50 --nproc_per_node 4 \
        --ck_bert BERT_DIR --pretrained_swin_weights swin_base_patch4_window12_384_22k.pth --output_dir repro

Each step is the real script through its real command line, in a subprocess (with --nproc_per_node > 1
through torchrun, the original's launcher):

    per share R (weak ratio W = 100 - R):
      mask_train_only.py  --ratios W                 -> splits/accR/<dataset>-W-{all,no-mask,mask}
      train.py   on no-mask                          Only Accurate, also the stage-1 teacher
      train.py   on all                              Naive-WREL
      train_stu_base.py on mask  --resume <teacher>  LRB stage 2 (the reference bank)
      train_stu_tea.py  on all   --resume <teacher> --caption_embedding_path <stage-2 bank>   LRB stage 3
      test.py on val and test for each method's best-on-val (oIoU) checkpoint
    --full: train.py on the unmasked data (the 100 % row) and its tests

The teacher is the Only-Accurate run's model_epoch_<--teacher_epoch>.pth (15, as the original README), or
its model_last (`--teacher_epoch last`) when that run is shorter.

Output folder:
    pipeline.json           the configuration of the last invocation (marks the folder as a pipeline folder)
    table.md, table.json    the table in the paper's form, with the configuration and the git commit
    figure.png              rows of test samples: image + expression | ground truth | the three methods
    logs/<step>.log         everything each step printed (one file per step; attempts are appended)
    stages/<step>/          checkpoints of the training steps and stage.json, the manifest of a finished step
    splits/, results/       the split data roots and the metrics JSON of every test

Re-running the same command reuses every finished step (its stage.json exists, holds the same command
line and inputs, and its files exist) and continues an interrupted training step from its
model_last_<id>.pth with --resume. A step whose own command line differs is refused (one line naming the
difference), so a finished folder is never replaced silently; `--fresh` redoes everything, or delete
stages/<step> to redo one step (the steps that depend on it follow).
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

if __package__ in (None, ''):  # run as a script from anywhere: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import utils
from utils import InputError

REPO = Path(__file__).resolve().parent
MODEL_ID = 'RMSIN'
PAPER_SWIN = './pretrained_weights/swin_base_patch4_window12_384_22k.pth'
METHODS = (('only-accurate', 'Only Accurate'), ('naive-wrel', 'Naive-WREL'), ('lrb-wrel', 'LRB-WREL'))
FULL_METHOD = ('rmsin', 'RMSIN')
EVAL_SPLITS = ('val', 'test')
COLUMNS = (('oIoU', 'val'), ('oIoU', 'test'), ('mIoU', 'val'), ('mIoU', 'test'))
# flags the pipeline sets itself; --extra_args may not repeat them
OWN_FLAGS = {'--epochs', '--lr', '--caption_lr', '--output-dir', '--resume', '--refer_data_root', '--dataset',
             '--splitBy', '--model_id', '--caption_embedding_path', '--split', '--results_json', '--overwrite',
             '--batch-size', '-b', '--seed', '--device', '--workers', '-j', '--swin_type', '--img_size',
             '--ck_bert', '--bert_tokenizer', '--pretrained_swin_weights', '--model', '--stop_after',
             '--caption_inner_steps', '--caption_update_every', '--print-freq', '--amp', '--window12'}
# flags that do not change a step's result: a different value does not make a finished step stale
NEUTRAL_FLAGS = {'--workers', '--print-freq'}


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog='reproduce.py',
        description="Reproduce the paper's table (Only Accurate / Naive-WREL / LRB-WREL per accurate share) "
                    'and its qualitative figure, each step through the real scripts.')
    g = p.add_argument_group('data and output')
    g.add_argument('--refer_data_root', required=True,
                   help='the unmasked data root: ROOT/<dataset>/{refs(<splitBy>).p, instances.json}, '
                        'images in ROOT/images/<dataset>/JPEGImages')
    g.add_argument('--dataset', default='rrsisd', help='rrsisd or res_lad (RIS-LAD)')
    g.add_argument('--splitBy', default='unc', help='refs file suffix: refs(<splitBy>).p')
    g.add_argument('--ratios', type=float, nargs='+', default=[10, 30, 50],
                   help='accurate-expression shares in percent, each in 1-99 (10 = the "10 %% accurate" '
                        'setting: mask_train_only.py --ratios 90)')
    g.add_argument('--full', action='store_true', help='add the 100 %% row: plain RMSIN on the unmasked data')
    g.add_argument('--split_seed', type=int, default=42, help="mask_train_only.py --seed (the authors' 42)")
    g.add_argument('--output_dir', required=True, help='pipeline folder (created; reused when it exists)')
    g.add_argument('--fresh', action='store_true', help='redo every step instead of reusing finished ones')
    g.add_argument('--figure_samples', type=int, default=6, help='rows of the qualitative figure (0: none)')

    g = p.add_argument_group('model (as train.py)')
    g.add_argument('--swin_type', default='base', help='nano, tiny, small, base (paper) or large')
    g.add_argument('--img_size', type=int, default=480, help='input size, a multiple of 32 (paper: 480)')
    g.add_argument('--pretrained_swin_weights', default=PAPER_SWIN,
                   help="official Swin weights; '' for random initialisation")
    g.add_argument('--window12', action='store_true',
                   help="window size 12 (also inferred from 'window12' in the weights' file name)")
    g.add_argument('--ck_bert', default='bert-base-uncased', help='BERT weights: a local folder (or a hub name)')
    g.add_argument('--bert_tokenizer', default=None, help='BERT tokenizer (default: --ck_bert)')

    g = p.add_argument_group('schedule (paper defaults)')
    g.add_argument('--epochs', type=int, default=40, help='epochs of every training step')
    for flag, what in (('stage1', 'Only Accurate = stage 1'), ('naive', 'Naive-WREL'), ('stage2', 'LRB stage 2'),
                       ('stage3', 'LRB stage 3'), ('full', 'the 100 %% row')):
        g.add_argument(f'--{flag}_epochs', type=int, default=None, help=f'epochs of {what} (default --epochs)')
    g.add_argument('--teacher_epoch', default='15',
                   help="the stage-1 checkpoint that LRB stages 2 and 3 start from: an epoch N with a "
                        "model_epoch_N.pth (10, 15, 20, ...; the original uses 15), or 'last' (the Only-Accurate "
                        "run's final weights)")
    g.add_argument('--batch_size', type=int, default=8, help='global batch size of every training step')
    g.add_argument('--lr', type=float, default=3e-5, help='learning rate of Only Accurate, Naive-WREL and the 100 %% row')
    g.add_argument('--stage2_lr', type=float, default=1e-5, help='learning rate of LRB stage 2 (the bank)')
    g.add_argument('--stage3_lr', type=float, default=2e-5, help='learning rate of LRB stage 3 (the student)')
    g.add_argument('--caption_lr', type=float, default=1e-6, help='learning rate of the bank in stage 3')
    g.add_argument('--caption_inner_steps', type=int, default=1)
    g.add_argument('--caption_update_every', type=int, default=1)
    g.add_argument('--seed', type=int, default=2401, help='--seed of every training step')
    g.add_argument('--amp', action='store_true', help='bf16 autocast on GPU')
    g.add_argument('--extra_args', default='',
                   help="more flags for every training and test script, e.g. '--mha 4-4-4-4 --cross_scale msda'")

    g = p.add_argument_group('launch')
    g.add_argument('--device', default='auto', help="auto (GPU when there is one), cuda or cpu")
    g.add_argument('--nproc_per_node', type=int, default=1,
                   help='processes (GPUs) per node; 1 runs each script with plain python, more through torchrun')
    g.add_argument('--nnodes', type=int, default=1, help='torchrun --nnodes (run this same command on every node)')
    g.add_argument('--node_rank', type=int, default=0, help='torchrun --node_rank')
    g.add_argument('--master_addr', default='127.0.0.1', help='torchrun --master_addr (multi-node)')
    g.add_argument('--master_port', type=int, default=29500,
                   help='torchrun --master_port (multi-node); the next port carries the step plan to the other nodes')
    g.add_argument('--torchrun_args', default='', help="more torchrun flags, e.g. '--rdzv_conf timeout=1800'")
    g.add_argument('--jobs', type=int, default=1,
                   help='steps run at the same time (CPU only; e.g. Naive-WREL beside the LRB chain)')
    g.add_argument('--workers', type=int, default=4, help='data-loading workers of every script')
    g.add_argument('--print_freq', type=int, default=10, help='--print-freq of the training scripts')
    g.add_argument('--progress_every', type=float, default=60,
                   help='seconds between progress lines inside an epoch')
    return p


def ratio_tag(value):
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Config:
    """The validated invocation."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir).absolute()
        self.data = Path(args.refer_data_root).absolute()
        self.ratios = [float(r) for r in args.ratios]
        self.epochs = {k: getattr(args, f'{k}_epochs') or args.epochs
                       for k in ('stage1', 'naive', 'stage2', 'stage3', 'full')}
        self.teacher = args.teacher_epoch
        self.window12 = bool(args.window12 or 'window12' in os.path.basename(args.pretrained_swin_weights or ''))
        self.device = args.device
        self.extra = shlex.split(args.extra_args)
        self.torchrun_extra = shlex.split(args.torchrun_args)
        self.tokenizer = args.bert_tokenizer or args.ck_bert

    @property
    def world(self):
        return self.args.nproc_per_node * self.args.nnodes

    @property
    def is_leader(self):
        return self.args.node_rank == 0


def _local_path(value):
    """An existing local path as an absolute path; a hub name (no such path, no separator) unchanged."""
    if value and os.path.exists(value):
        return str(Path(value).absolute())
    return value


def visible_gpus():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def validate(args):
    """Every check that needs no training, before anything runs -> Config."""
    if not args.ratios:
        raise InputError('--ratios: give at least one accurate share')
    seen = set()
    for r in args.ratios:
        if not (math.isfinite(r) and 1 <= r <= 99):
            raise InputError(f'--ratios {ratio_tag(r) if math.isfinite(r) else r}: an accurate share must be within '
                             f'1-99 percent (the 100 % row is --full)')
        if ratio_tag(r) in seen:
            raise InputError(f'--ratios {ratio_tag(r)}: given twice')
        seen.add(ratio_tag(r))
    for flag in ('epochs', 'stage1_epochs', 'naive_epochs', 'stage2_epochs', 'stage3_epochs', 'full_epochs'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f'--{flag} {value}: must be >= 1')
    for flag in ('lr', 'stage2_lr', 'stage3_lr', 'caption_lr'):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise InputError(f'--{flag} {value}: must be a finite number > 0')
    for flag, low in (('batch_size', 1), ('caption_inner_steps', 1), ('caption_update_every', 1), ('workers', 0),
                      ('nproc_per_node', 1), ('nnodes', 1), ('jobs', 1), ('figure_samples', 0), ('print_freq', 1)):
        if getattr(args, flag) < low:
            raise InputError(f'--{flag} {getattr(args, flag)}: must be >= {low}')
    if args.img_size < 32 or args.img_size % 32:
        raise InputError(f'--img_size {args.img_size}: must be a positive multiple of 32')
    if not 0 <= args.node_rank < args.nnodes:
        raise InputError(f'--node_rank {args.node_rank}: must be in 0..{args.nnodes - 1} (--nnodes {args.nnodes})')

    cfg = Config(args)
    world = args.nproc_per_node * args.nnodes
    if args.batch_size % world:
        raise InputError(f'--batch_size {args.batch_size}: not divisible by the {world} processes '
                         f'(--nproc_per_node x --nnodes)')
    # the teacher checkpoint must be one the Only-Accurate run writes
    if cfg.teacher != 'last':
        try:
            t = int(cfg.teacher)
        except ValueError:
            raise InputError(f"--teacher_epoch {cfg.teacher}: give an epoch (10, 15, 20, ...) or 'last'") from None
        if t < 10 or (t - 10) % 5:
            raise InputError(f'--teacher_epoch {t}: train.py writes model_epoch_N.pth only at N = 10, 15, 20, ...; '
                             f"pick one of those or 'last'")
        if t >= cfg.epochs['stage1']:
            raise InputError(f'--teacher_epoch {t}: the Only-Accurate run has {cfg.epochs["stage1"]} epochs '
                             f'(0-{cfg.epochs["stage1"] - 1}), so it never writes model_epoch_{t}.pth; pass '
                             f"--teacher_epoch last or a smaller epoch")
        cfg.teacher = str(t)
    # data
    if not cfg.data.is_dir():
        raise InputError(f'--refer_data_root {args.refer_data_root}: no such directory')
    from refer.refer import IMAGE_DIRS
    if args.dataset not in IMAGE_DIRS:
        raise InputError(f"--dataset {args.dataset}: unknown; known: {', '.join(IMAGE_DIRS)}")
    for name in (f'refs({args.splitBy}).p', 'instances.json'):
        if not (cfg.data / args.dataset / name).is_file():
            raise InputError(f'--refer_data_root {args.refer_data_root}: no {args.dataset}/{name} in it')
    if not (cfg.data / IMAGE_DIRS[args.dataset]).is_dir():
        raise InputError(f'--refer_data_root {args.refer_data_root}: no image folder {IMAGE_DIRS[args.dataset]} in it')
    # weights
    if args.pretrained_swin_weights and not os.path.isfile(args.pretrained_swin_weights):
        raise InputError(f"--pretrained_swin_weights {args.pretrained_swin_weights}: file not found (download "
                         f"swin_base_patch4_window12_384_22k.pth, or pass '' for random initialisation)")
    for flag, value in (('--ck_bert', args.ck_bert), ('--bert_tokenizer', cfg.tokenizer)):
        looks_local = os.sep in value or value.startswith('.')
        if looks_local and not os.path.isdir(value):
            raise InputError(f'{flag} {value}: no such folder (download bert-base-uncased into a folder and pass it)')
    # extra flags
    for flag in cfg.extra:
        name = flag.split('=', 1)[0]
        if name in OWN_FLAGS:
            raise InputError(f'--extra_args: {name} is set by reproduce.py itself (use its own flag)')
    # devices
    if args.device not in ('auto', 'cpu', 'cuda'):
        raise InputError(f'--device {args.device}: expected auto, cuda or cpu')
    gpus = visible_gpus() if args.device != 'cpu' else 0
    if args.device == 'auto':
        cfg.device = 'cuda' if gpus else 'cpu'
        if not gpus and args.nproc_per_node > 1:
            raise InputError(f'--nproc_per_node {args.nproc_per_node}: larger than the 0 GPUs present '
                             f'(pass --device cpu for CPU processes)')
    if cfg.device == 'cuda':
        if not gpus:
            raise InputError('--device cuda: no GPU is visible here (pass --device cpu)')
        if args.nproc_per_node > gpus:
            raise InputError(f'--nproc_per_node {args.nproc_per_node}: larger than the {gpus} GPU(s) present '
                             f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")})')
    if args.jobs > 1 and (cfg.device != 'cpu' or args.nnodes > 1):
        raise InputError(f'--jobs {args.jobs}: steps can run side by side only on CPU in one node '
                         f'(on GPUs each step uses all --nproc_per_node of them)')
    # output folder
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f'--output_dir {args.output_dir}: is a file')
    if cfg.is_leader and cfg.out.is_dir() and any(cfg.out.iterdir()) and not (cfg.out / 'pipeline.json').is_file():
        raise InputError(f'--output_dir {args.output_dir}: holds files but no pipeline.json, so it is not a '
                         f'reproduce.py folder; choose a new or empty folder')
    utils.check_writable_dir(cfg.out, '--output_dir')
    return cfg


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------

class Step:
    """One script run. kind: splits | train | test. `outputs`: the files a finished step has."""

    def __init__(self, name, kind, script, args, outputs, deps=(), resumable=False, label=''):
        self.name, self.kind, self.script, self.args = name, kind, script, [str(a) for a in args]
        self.outputs = [Path(o) for o in outputs]
        self.deps = list(deps)
        self.resumable = resumable  # continues from model_last_<id>.pth with --resume
        self.label = label or name
        self.epochs = None

    @property
    def distributed(self):  # through torchrun when there are several processes
        return self.kind != 'splits'

    def __repr__(self):
        return f'Step({self.name})'


class Plan:
    def __init__(self, cfg):
        self.cfg = cfg
        a = cfg.args
        out = cfg.out
        self.stages, self.logs, self.results = out / 'stages', out / 'logs', out / 'results'
        self.steps = []
        self.methods = {}  # (share, method) -> best checkpoint
        common = ['--dataset', a.dataset, '--splitBy', a.splitBy, '--swin_type', a.swin_type, '--img_size', a.img_size,
                  '--ck_bert', _local_path(a.ck_bert), '--bert_tokenizer', _local_path(cfg.tokenizer),
                  '--workers', a.workers, '--device', cfg.device]
        if cfg.window12:
            common.append('--window12')
        if a.amp:
            common.append('--amp')
        self.test_common = common + cfg.extra
        swin = _local_path(a.pretrained_swin_weights) if a.pretrained_swin_weights else ''
        self.train_common = common + ['--pretrained_swin_weights', swin, '--batch-size', a.batch_size, '--seed',
                                      a.seed, '--model_id', MODEL_ID, '--print-freq', a.print_freq] + cfg.extra
        if a.full:
            self._full()
        for share in cfg.ratios:
            self._share(share)

    def stage_dir(self, name):
        return self.stages / name

    def _train(self, name, script, root, epochs, lr, extra=(), deps=(), outputs=(), label=''):
        d = self.stage_dir(name)
        step = Step(name, 'train', script, ['--refer_data_root', root, '--epochs', epochs, '--lr', lr,
                                            '--output-dir', d, *self.train_common, *extra],
                    [d / f'model_last_{MODEL_ID}.pth', *[d / o for o in outputs]], deps, resumable=True, label=label)
        step.epochs = epochs
        self.steps.append(step)
        return step

    def _tests(self, prefix, method, checkpoint, train_step):
        for split in EVAL_SPLITS:
            name = f'{prefix}-{method}-{split}'
            result = self.results / f'{name}.json'
            self.steps.append(Step(name, 'test', 'test.py',
                                   ['--refer_data_root', self.cfg.data, '--resume', checkpoint, '--split', split,
                                    '--results_json', result, '--overwrite', *self.test_common],
                                   [result], [train_step.name], label=f'{prefix} {method} test on {split}'))

    def _full(self):
        e = self.cfg.epochs['full']
        step = self._train('acc100-rmsin', 'train.py', self.cfg.data, e, self.cfg.args.lr,
                           outputs=[f'model_best_{MODEL_ID}.pth'], label='100 % RMSIN')
        best = step.outputs[1]
        self.methods[(100.0, FULL_METHOD[0])] = best
        self._tests('acc100', FULL_METHOD[0], best, step)

    def _share(self, share):
        cfg, a = self.cfg, self.cfg.args
        prefix = f'acc{ratio_tag(share)}'
        weak = ratio_tag(100 - share)
        split_dir = cfg.out / 'splits' / prefix
        roots = {view: split_dir / f'{a.dataset}-{weak}-{view}' for view in ('all', 'no-mask', 'mask')}
        splits = Step(f'{prefix}-splits', 'splits', 'mask_train_only.py',
                      ['--refer_data_root', cfg.data, '--dataset', a.dataset, '--splitBy', a.splitBy,
                       '--output_dir', split_dir, '--ratios', weak, '--seed', a.split_seed, '--overwrite'],
                      [roots[v] / a.dataset / f'refs({a.splitBy}).p' for v in roots], label=f'{prefix} splits')
        self.steps.append(splits)
        teacher_file = (f'model_last_{MODEL_ID}.pth' if cfg.teacher == 'last'
                        else f'model_epoch_{cfg.teacher}.pth')
        e = cfg.epochs
        only = self._train(f'{prefix}-only-accurate', 'train.py', roots['no-mask'], e['stage1'], a.lr,
                           deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth', teacher_file],
                           label=f'{prefix} Only Accurate (= LRB stage 1)')
        naive = self._train(f'{prefix}-naive-wrel', 'train.py', roots['all'], e['naive'], a.lr,
                            deps=[splits.name], outputs=[f'model_best_{MODEL_ID}.pth'], label=f'{prefix} Naive-WREL')
        teacher = self.stage_dir(only.name) / teacher_file
        s2 = self._train(f'{prefix}-lrb-stage2', 'train_stu_base.py', roots['mask'], e['stage2'], a.stage2_lr,
                         extra=['--resume', teacher], deps=[only.name],
                         outputs=[f'caption_embeddings_{MODEL_ID}.pt'], label=f'{prefix} LRB stage 2')
        bank = self.stage_dir(s2.name) / f'caption_embeddings_{MODEL_ID}.pt'
        s3 = self._train(f'{prefix}-lrb-stage3', 'train_stu_tea.py', roots['all'], e['stage3'], a.stage3_lr,
                         extra=['--caption_lr', a.caption_lr, '--caption_inner_steps', a.caption_inner_steps,
                                '--caption_update_every', a.caption_update_every, '--resume', teacher,
                                '--caption_embedding_path', bank],
                         deps=[only.name, s2.name], outputs=[f'model_best_oIoU_{MODEL_ID}.pth'],
                         label=f'{prefix} LRB stage 3')
        for (method, _), step, ckpt in zip(METHODS, (only, naive, s3),
                                           (f'model_best_{MODEL_ID}.pth', f'model_best_{MODEL_ID}.pth',
                                            f'model_best_oIoU_{MODEL_ID}.pth')):
            best = self.stage_dir(step.name) / ckpt
            self.methods[(share, method)] = best
            self._tests(prefix, method, best, step)

    def result_file(self, share, method, split):
        return self.results / f'acc{ratio_tag(share)}-{method}-{split}.json'


# ------------------------------------------------------------------------------------------------
# manifests: when a step is finished, and with what
# ------------------------------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, data):
    with utils.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + '\n')


def canonical_args(args, out):
    """A step's command line as compared between runs: output paths relative to the pipeline folder, the
    flags that do not change results dropped."""
    canon, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in NEUTRAL_FLAGS:
            skip = True
            continue
        canon.append(a.replace(str(out), '$OUT'))
    return canon


def args_difference(old, new):
    """'--epochs 40 -> 20' for the first flag whose value differs (or the whole lines)."""
    def flags(line):
        d, key = {}, None
        for a in line:
            if a.startswith('-') and not _is_number(a):
                key = a
                d.setdefault(key, [])
            elif key is not None:
                d[key].append(a)
        return d
    fo, fn = flags(old), flags(new)
    for k in list(fn) + [k for k in fo if k not in fn]:
        if fo.get(k) != fn.get(k):
            show = lambda v: 'absent' if v is None else (' '.join(v) or 'set')
            return f'{k} {show(fo.get(k))} -> {show(fn.get(k))}'
    return f'{shlex.join(old)} -> {shlex.join(new)}'


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def file_digest(paths):
    h = hashlib.sha1()
    for p in paths:
        with open(p, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                h.update(chunk)
    return h.hexdigest()[:16]


class Manifests:
    """stages/<step>/stage.json (finished) and started.json (running or interrupted)."""

    def __init__(self, plan, data_digest):
        self.plan = plan
        self.out = plan.cfg.out
        self.data_digest = data_digest
        self.result_ids = {}

    def done_path(self, step):
        return self.plan.stage_dir(step.name) / 'stage.json'

    def started_path(self, step):
        return self.plan.stage_dir(step.name) / 'started.json'

    def config(self, step):
        inputs = {'data': self.data_digest}
        inputs.update({d: self.result_ids.get(d) for d in step.deps})
        return {'script': step.script, 'args': canonical_args(step.args, self.out), 'inputs': inputs}

    def refusal(self, step):
        """A finished or started step whose own command line differs: the one-line reason, else None."""
        cfg = self.config(step)
        for path, state in ((self.done_path(step), 'finished'), (self.started_path(step), 'was started')):
            old = read_json(path)
            if old and old.get('config', {}).get('args') is not None:
                if (old['config'].get('script'), old['config']['args']) != (cfg['script'], cfg['args']):
                    return (f'step {step.name} in {self.plan.stage_dir(step.name)} {state} with another '
                            f"configuration ({args_difference(old['config']['args'], cfg['args'])}); pass --fresh "
                            f'to redo every step, delete that folder to redo this one, or choose another --output_dir')
        return None

    def decide(self, step):
        """-> ('reuse' | 'continue' | 'run', reason)."""
        cfg = self.config(step)
        done = read_json(self.done_path(step))
        if done and done.get('config') == cfg:
            missing = [o for o in step.outputs if not o.exists()]
            if not missing:
                self.result_ids[step.name] = done['result_id']
                return 'reuse', f"finished {done.get('finished', '')}"
            return 'run', f'{missing[0].name} is missing'
        reason = 'inputs changed' if done else ''
        started = read_json(self.started_path(step))
        last = self.plan.stage_dir(step.name) / f'model_last_{MODEL_ID}.pth'
        if step.resumable and started and started.get('config') == cfg and last.is_file():
            return 'continue', f'from {last.name}'
        if started and started.get('config') != cfg:
            reason = 'inputs changed'
        return 'run', reason

    def begin(self, step, mode):
        d = self.plan.stage_dir(step.name)
        if mode == 'run':  # the pipeline owns this folder: start clean
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            write_json(self.started_path(step), {'step': step.name, 'config': self.config(step),
                                                 'started': now()})

    def finish(self, step, command, seconds):
        missing = [o for o in step.outputs if not o.exists()]
        if missing:
            raise InputError(f'step {step.name} exited normally but did not write {missing[0]}; see '
                             f'{self.plan.logs / (step.name + ".log")}')
        rid = uuid.uuid4().hex
        write_json(self.done_path(step), {'step': step.name, 'config': self.config(step), 'command': command,
                                          'outputs': [str(o) for o in step.outputs], 'finished': now(),
                                          'seconds': round(seconds, 1), 'result_id': rid, 'git': git_info()})
        with_suppress(lambda: self.started_path(step).unlink())
        self.result_ids[step.name] = rid


def with_suppress(fn):
    try:
        fn()
    except OSError:
        pass


def now():
    return datetime.datetime.now().isoformat(timespec='seconds')


def git_info():
    def git(*cmd):
        r = subprocess.run(['git', '--no-optional-locks', '-C', str(REPO), *cmd], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no')
    return {'commit': commit, 'dirty': bool(status) if status is not None else None}


# ------------------------------------------------------------------------------------------------
# running a step: subprocess, its log, progress lines
# ------------------------------------------------------------------------------------------------

class Printer:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, text):
        with self.lock:
            print(f'{time.strftime("%H:%M:%S")} {text}', flush=True)


def hms(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class Progress:
    """Reads a step's output lines; prints which epoch it is in, the validation score and the ETA."""
    ITER = re.compile(r'Epoch: \[(\d+)\] \[(\d+)/(\d+)\].*?eta: (\d+:\d\d:\d\d)')
    EPOCH = re.compile(r'Epoch (\d+): train loss \S+, (\d+)s \(([^)]*)\)')
    RESUMED = re.compile(r'continuing at epoch (\d+)')
    OIOU = re.compile(r'overall IoU = ([\d.]+)')
    MIOU = re.compile(r'Mean IoU is ([\d.]+)')

    def __init__(self, step, say, every):
        self.step, self.say, self.every = step, say, every
        self.start = time.time()
        self.first_epoch = 0
        self.epochs_done = 0
        self.pending_epoch = None
        self.miou = None
        self.last_said = time.time()
        self.epoch_start = time.time()

    def feed(self, line):
        m = self.RESUMED.search(line)
        if m:
            self.first_epoch = int(m.group(1))
            return
        m = self.MIOU.search(line)
        if m:
            self.miou = float(m.group(1))
            return
        m = self.EPOCH.search(line)
        if m:
            self.pending_epoch = (int(m.group(1)), m.group(3))
            return
        m = self.OIOU.search(line)
        if m:
            oiou = float(m.group(1))
            if self.pending_epoch is not None:
                self.epoch_finished(*self.pending_epoch, oiou)
                self.pending_epoch = None
            elif self.step.kind == 'test':
                self.say(f'{self.step.name}: oIoU {oiou:.2f}, mIoU {self.miou or 0:.2f}')
            return
        m = self.ITER.search(line)
        if m and time.time() - self.last_said >= self.every and self.step.epochs:
            epoch, i, n, eta = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
            self.last_said = time.time()
            self.say(f'{self.step.name}: epoch {epoch + 1}/{self.step.epochs}, iteration {i}/{n}, '
                     f'epoch eta {eta}, step eta {hms(self.eta(epoch, i, n))}')

    def eta(self, epoch, i=None, n=None):
        remaining = self.step.epochs - epoch - 1
        if self.epochs_done:
            per_epoch = (time.time() - self.start) / self.epochs_done
            return per_epoch * (remaining + 1 - (i / n if i else 1))
        if i:  # inside the first epoch: scale its elapsed time
            per_epoch = (time.time() - self.start) / (i / n)
            return per_epoch * (remaining + 1 - i / n)
        return 0

    def epoch_finished(self, epoch, desc, oiou):
        self.epochs_done += 1
        self.last_said = time.time()
        per_epoch = (time.time() - self.start) / self.epochs_done
        eta = per_epoch * (self.step.epochs - epoch - 1)
        self.say(f'{self.step.name}: epoch {epoch + 1}/{self.step.epochs} done, {desc} oIoU {oiou:.2f} '
                 f'mIoU {self.miou or 0:.2f}, {per_epoch:.0f} s/epoch, step eta {hms(eta)}')


def python_env(cfg):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    if cfg.device == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        env['OMP_NUM_THREADS'] = str(max(1, cores // (cfg.args.jobs * cfg.args.nproc_per_node)))
    return env


def launcher(cfg, step):
    a = cfg.args
    script = str(REPO / step.script)
    if not step.distributed or cfg.world == 1:
        return [sys.executable, script]
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={a.nproc_per_node}']
    if a.nnodes == 1:
        cmd.append('--standalone')  # a free port per step: steps never collide
    else:
        cmd += [f'--nnodes={a.nnodes}', f'--node_rank={a.node_rank}', f'--master_addr={a.master_addr}',
                f'--master_port={a.master_port}']
    return cmd + cfg.torchrun_extra + [script]


class StepFailed(Exception):
    pass


class Runner:
    """Runs steps as subprocesses, each with its log file; several at once with --jobs."""

    def __init__(self, cfg, plan, say):
        self.cfg, self.plan, self.say = cfg, plan, say
        self.procs = {}
        self.lock = threading.Lock()
        self.env = python_env(cfg)

    def command(self, step, args):
        return launcher(self.cfg, step) + args

    def log_path(self, step, node=None):
        node = self.cfg.args.node_rank if node is None else node
        return self.plan.logs / (f'{step.name}.log' if node == 0 else f'{step.name}.node{node}.log')

    def run(self, step, args):
        """Run and wait; raises StepFailed with a one-line reason. -> the command line."""
        cmd = self.command(step, args)
        log_path = self.log_path(step)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        progress = Progress(step, self.say, self.cfg.args.progress_every)
        tail = []
        with open(log_path, 'a') as log:
            log.write(f'\n===== {now()} {shlex.join(cmd)}\n')
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    errors='replace', env=self.env)
            with self.lock:
                self.procs[step.name] = proc
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if line.strip():
                        tail = (tail + [line.strip()])[-20:]
                    progress.feed(line)
                rc = proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(step.name, None)
        if rc != 0:
            raise StepFailed(f'{step.name} failed (exit {rc}): {failure_line(tail)}; log: {log_path}')
        return cmd

    def interrupt_all(self, grace=0.0):
        """Stop the running steps: SIGINT first (they exit as after Ctrl-C; every checkpoint is written
        atomically, so the last one stays whole), then SIGTERM and SIGKILL for a step that ignores it (a
        shell's background job ignores SIGINT). `grace`: seconds to let them exit on their own first
        (a terminal's Ctrl-C reached them already)."""
        with self.lock:
            procs = list(self.procs.values())

        def wait(alive, seconds):
            deadline = time.time() + seconds
            for p in alive:
                try:
                    p.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass

        wait(procs, grace)
        for sig, seconds in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                return
            for p in alive:
                with_suppress(lambda: p.send_signal(sig))
            wait(alive, seconds)


def failure_line(tail):
    """The most telling line of a failed step's output: its one-line error, else the exception's line."""
    for line in reversed(tail):
        if ': error: ' in line or re.match(r'^[\w.]*(Error|Exception)\b', line):
            return line[:300]
    return (tail[-1][:300] if tail else 'no output')


# ------------------------------------------------------------------------------------------------
# the plan to other nodes (multi-node): node 0 decides, the others run what it publishes
# ------------------------------------------------------------------------------------------------

class PlanChannel:
    TIMEOUT = datetime.timedelta(days=7)

    def __init__(self, cfg):
        from torch.distributed import TCPStore
        a = cfg.args
        self.port = a.master_port + 1
        self.store = TCPStore(a.master_addr, self.port, is_master=cfg.is_leader, timeout=self.TIMEOUT,
                              wait_for_workers=False)
        self.count = 0
        self.nnodes = a.nnodes

    def publish(self, message):
        self.store.set(f'step/{self.count}', json.dumps(message))
        self.count += 1

    def close(self, ok):
        self.publish({'end': True, 'ok': ok})
        try:  # keep the store up until every node has read the end
            self.store.wait([f'ack/{n}' for n in range(1, self.nnodes)], datetime.timedelta(minutes=2))
        except Exception:
            pass

    def receive(self):
        message = json.loads(self.store.get(f'step/{self.count}'))
        self.count += 1
        return message

    def ack(self, node_rank):
        self.store.set(f'ack/{node_rank}', '1')


def follow(cfg, plan, say):
    """Nodes other than 0: run each distributed step node 0 publishes, with this node's torchrun flags."""
    channel = PlanChannel(cfg)
    runner = Runner(cfg, plan, say)
    steps = {s.name: s for s in plan.steps}
    say(f'node {cfg.args.node_rank}: following node 0 at {cfg.args.master_addr}:{channel.port}')
    while True:
        message = channel.receive()
        if message.get('end'):
            channel.ack(cfg.args.node_rank)
            if not message.get('ok'):
                raise InputError('node 0 stopped the pipeline; see its output')
            say('node 0 finished the pipeline')
            return
        step = steps.get(message['step'])
        if step is None:
            raise InputError(f"node 0 published step {message['step']}, which this node's command does not have: "
                             f'run the same command on every node')
        say(f'running {step.name}')
        try:
            runner.run(step, message['args'])
        except StepFailed as e:
            raise InputError(f'step {e}') from None


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------

def execute(cfg, plan, manifests, say, on_step_done, channel=None):
    """Run the plan's steps in order (up to --jobs at once when their inputs are ready)."""
    runner = Runner(cfg, plan, say)
    pending = list(plan.steps)
    finished = set()
    results = queue.Queue()
    running = {}
    failure = None
    total = len(plan.steps)
    position = {s.name: i + 1 for i, s in enumerate(plan.steps)}

    def work(step, args):
        t0 = time.time()
        try:
            cmd = runner.run(step, args)
            results.put((step, cmd, time.time() - t0, None))
        except StepFailed as e:
            results.put((step, None, 0, str(e)))
        except Exception as e:  # noqa: BLE001 - reported as the step's failure
            results.put((step, None, 0, f'{step.name} failed: {type(e).__name__}: {e}'))

    try:
        while pending or running:
            while failure is None and len(running) < cfg.args.jobs:
                ready = next((s for s in pending if all(d in finished for d in s.deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                mode, reason = manifests.decide(ready)
                tag = f'[{position[ready.name]}/{total}] {ready.name}'
                if mode == 'reuse':
                    say(f'{tag}: reused ({reason})')
                    finished.add(ready.name)
                    on_step_done(ready)
                    continue
                args = list(ready.args)
                if mode == 'continue':
                    args = replace_flag(args, '--resume', str(plan.stage_dir(ready.name) / f'model_last_{MODEL_ID}.pth'))
                manifests.begin(ready, mode)
                what = {'continue': f'continuing {reason}', 'run': 'running' + (f' ({reason})' if reason else '')}[mode]
                epochs = f', {ready.epochs} epochs' if ready.epochs else ''
                say(f'{tag}: {what}: {ready.script}{epochs}; log {runner.log_path(ready)}')
                if channel is not None and ready.distributed and cfg.world > cfg.args.nproc_per_node:
                    channel.publish({'step': ready.name, 'args': args})
                t = threading.Thread(target=work, args=(ready, args), daemon=True)
                running[ready.name] = t
                t.start()
            if not running:
                if failure is not None or not pending:
                    break
                raise InputError(f'steps {", ".join(s.name for s in pending)} wait for inputs that never come')
            step, cmd, seconds, error = results.get()
            running.pop(step.name)
            if error is not None:
                if failure is None:
                    failure = error
                    if running:
                        say(f'stopping {", ".join(running)} (they continue from their last checkpoint next time)')
                        runner.interrupt_all()
                continue
            try:
                manifests.finish(step, cmd, seconds)
            except InputError as e:  # it exited 0 but its files are not there
                if failure is None:
                    failure = str(e)[len('step '):]
                    runner.interrupt_all()
                continue
            say(f'[{position[step.name]}/{total}] {step.name}: done in {hms(seconds)}')
            finished.add(step.name)
            on_step_done(step)
    except KeyboardInterrupt:
        runner.interrupt_all(grace=10)
        print('\nreproduce.py: interrupted; run the same command again to continue (finished steps are reused, '
              'an interrupted training continues from its last checkpoint)', file=sys.stderr, flush=True)
        sys.exit(130)
    except BaseException:  # no step outlives the pipeline
        runner.interrupt_all()
        raise
    if failure is not None:
        raise InputError(f'step {failure}')


def replace_flag(args, flag, value):
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

def trivial_scores(cfg):
    """oIoU / mIoU (percent) of predicting every pixel as the object, per split, over every sentence
    (as test.py counts them), from the masks at the images' own size."""
    from refer.refer import REFER
    refer = REFER(str(cfg.data), cfg.args.dataset, cfg.args.splitBy)
    scores = {}
    for split in EVAL_SPLITS:
        cum_i = cum_u = 0.0
        fractions = []
        for ref_id in refer.getRefIds(split=split):
            ref = refer.Refs[ref_id]
            img = refer.Imgs[ref['image_id']]
            area = refer.getMask(ref)['area']
            pixels = img['height'] * img['width']
            k = len(ref['sentences'])
            cum_i += k * area
            cum_u += k * pixels
            fractions += [area / pixels] * k
        scores[split] = {'oIoU': 100 * cum_i / cum_u if cum_u else 0.0,
                         'mIoU': 100 * sum(fractions) / len(fractions) if fractions else 0.0}
    return scores


def table_rows(plan):
    rows = []
    shares = ([100.0] if plan.cfg.args.full else []) + list(plan.cfg.ratios)
    for share in shares:
        methods = [FULL_METHOD] if share == 100.0 else METHODS
        for key, label in methods:
            row = {'ratio': share, 'method': label, 'checkpoint': str(plan.methods[(share, key)])}
            for metric, split in COLUMNS:
                res = read_json(plan.result_file(share, key, split))
                row[f'{metric}_{split}'] = round(res[metric], 2) if res else None
            for split in EVAL_SPLITS:
                res = read_json(plan.result_file(share, key, split))
                row[f'num_sentences_{split}'] = res.get('num_sentences') if res else None
            rows.append(row)
    return rows


def table_markdown(rows, meta):
    head = '| Ratio | Method | oIoU Val | oIoU Test | mIoU Val | mIoU Test |'
    lines = [head, '|-------|--------|----------|-----------|----------|-----------|']
    best = {}
    for row in rows:
        if row['method'] == FULL_METHOD[1]:
            continue
        for metric, split in COLUMNS:
            k = f'{metric}_{split}'
            if row[k] is not None:
                best[(row['ratio'], k)] = max(best.get((row['ratio'], k), -1.0), row[k])
    previous = None
    for row in rows:
        ratio = f"{ratio_tag(row['ratio'])}%" if row['ratio'] != previous else ''
        previous = row['ratio']
        cells = []
        for metric, split in COLUMNS:
            v = row[f'{metric}_{split}']
            text = '–' if v is None else f'{v:.2f}'
            if v is not None and row['method'] != FULL_METHOD[1] and v == best.get((row['ratio'], f'{metric}_{split}')):
                text = f'**{text}**'
            cells.append(text)
        lines.append(f"| {ratio:<5} | {row['method']} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def describe_git(g):
    return f"{g.get('commit') or 'unknown'}{' (with uncommitted changes)' if g.get('dirty') else ''}"


def steps_git(plan):
    """{step: the git commit (and dirtiness) it ran at}, from the manifests of the finished steps."""
    out = {}
    for step in plan.steps:
        done = read_json(plan.stage_dir(step.name) / 'stage.json')
        if done and isinstance(done.get('git'), dict):
            out[step.name] = done['git']
    return out


def write_table(plan, trivial):
    cfg, a = plan.cfg, plan.cfg.args
    rows = table_rows(plan)
    g = git_info()
    teacher = ('final weights (model_last, --teacher_epoch last)' if cfg.teacher == 'last'
               else f'model_epoch_{cfg.teacher}.pth')
    config = {
        'dataset': a.dataset, 'refer_data_root': str(cfg.data), 'ratios': cfg.ratios, 'full': a.full,
        'epochs': cfg.epochs, 'teacher': f'Only-Accurate run, {teacher}', 'batch_size': a.batch_size,
        'lr': a.lr, 'stage2_lr': a.stage2_lr, 'stage3_lr': a.stage3_lr, 'caption_lr': a.caption_lr,
        'caption_inner_steps': a.caption_inner_steps, 'caption_update_every': a.caption_update_every,
        'seed': a.seed, 'split_seed': a.split_seed, 'swin_type': a.swin_type, 'img_size': a.img_size,
        'window12': cfg.window12, 'pretrained_swin_weights': a.pretrained_swin_weights, 'ck_bert': a.ck_bert,
        'amp': a.amp, 'extra_args': a.extra_args, 'device': cfg.device, 'processes': cfg.world,
        'checkpoints': 'each run\'s best val-oIoU checkpoint (model_best; LRB-WREL: stage 3\'s model_best_oIoU)'}
    data = {'dataset': a.dataset, 'columns': ['ratio', 'method'] + [f'{m}_{s}' for m, s in COLUMNS], 'rows': rows,
            'trivial': trivial, 'config': config, 'git': g, 'steps_git': steps_git(plan), 'written': now()}
    epochs = cfg.epochs
    e_text = (f'{epochs["stage1"]} epochs each' if len(set(epochs.values())) == 1 else
              f'Only Accurate {epochs["stage1"]}, Naive-WREL {epochs["naive"]}, LRB stage 2 {epochs["stage2"]}, '
              f'stage 3 {epochs["stage3"]}' + (f', RMSIN {epochs["full"]}' if a.full else '') + ' epochs')
    notes = [
        f'Dataset `{a.dataset}`; ratio = share of train expressions kept accurate; oIoU / mIoU in percent over '
        f'every sentence of the split; each method tested at its best val-oIoU checkpoint.',
        f'Swin-{a.swin_type}, {a.img_size} px, batch {a.batch_size}, {e_text}; lr {a.lr:g} '
        f'(stage 2 {a.stage2_lr:g}, stage 3 {a.stage3_lr:g}, bank {a.caption_lr:g}); LRB teacher: the Only-Accurate '
        f'run\'s {teacher}; seed {a.seed}; {cfg.world} process(es) on {cfg.device}.',
    ]
    if trivial:
        notes.append('Every pixel predicted as the object scores oIoU {:.2f} / {:.2f} and mIoU {:.2f} / {:.2f} '
                     '(val / test).'.format(trivial['val']['oIoU'], trivial['test']['oIoU'],
                                            trivial['val']['mIoU'], trivial['test']['mIoU']))
    ran = sorted({describe_git(v) for v in data['steps_git'].values()})
    notes.append(f"Code: the steps ran at git commit {', '.join(ran) or 'unknown'}; table written at "
                 f'{describe_git(g)}.' if ran != [describe_git(g)] else f'Code: git commit {describe_git(g)}.')
    markdown = (f'## {a.dataset}: Only Accurate vs Naive-WREL vs LRB-WREL\n\n' + table_markdown(rows, data) + '\n\n'
                + '\n'.join(f'- {n}' for n in notes) + '\n')
    write_json(cfg.out / 'table.json', data)
    with utils.atomic_file(cfg.out / 'table.md') as tmp:
        tmp.write_text(markdown)
    return markdown


# ------------------------------------------------------------------------------------------------
# the figure
# ------------------------------------------------------------------------------------------------

def make_figure(plan, share, path, samples):
    """Rows of test samples; columns: the image with its expression, the ground truth, then each method's
    prediction (its best checkpoint, as tested), with its IoU."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from bert.encoder import load_tokenizer
    from lib import engine
    from refer.dataset import ReferDataset
    from refer.refer import REFER

    cfg = plan.cfg
    ns = utils.get_parser().parse_args([str(x) for x in plan.test_common] + ['--refer_data_root', str(cfg.data)])
    tokenizer = load_tokenizer(ns.bert_tokenizer)
    refer = REFER(str(cfg.data), ns.dataset, ns.splitBy)
    dataset = ReferDataset(refer, 'test', tokenizer, ns.img_size, eval_mode=True, random_boxes=False,
                           check_images=False)
    n = min(samples, len(dataset))
    picks = sorted({round(i * (len(dataset) - 1) / max(1, n - 1)) for i in range(n)})
    items = [dataset[i] for i in picks]
    device = torch.device('cuda' if cfg.device == 'cuda' else 'cpu')
    columns = [(key, label) for key, label in METHODS]
    preds = {}
    for key, label in columns:
        ckpt = plan.methods[(share, key)]
        with contextlib.redirect_stdout(io.StringIO()):  # its 'randomly initialize' line: weights come next
            model, bert = engine.build_model(ns, pretrained='')
        engine.load_model_and_bert(engine.load_checkpoint(str(ckpt)), model, bert, source=str(ckpt))
        model.to(device).eval()
        bert.to(device).eval()
        out = []
        with torch.no_grad():
            for item in items:
                logits = engine.segment(model, bert, item['image'][None].to(device),
                                        item['input_ids'][:1].to(device), item['attention_mask'][:1].to(device))
                out.append(logits.argmax(1)[0].cpu())
        preds[key] = out
        del model, bert

    mean = torch.tensor(engine.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(engine.IMAGENET_STD).view(3, 1, 1)
    size = ns.img_size
    cell = size * max(1, -(-128 // size)) if size < 128 else min(size, 256)
    font = _font(12)
    pad, head, band = 4, 20, 46

    def tile(rgb, mask, color):
        out = rgb.astype(np.float32).copy()
        if mask is not None:
            m = mask.numpy().astype(bool)
            out[m] = 0.5 * out[m] + 0.5 * np.array(color, np.float32)
        return Image.fromarray(out.round().astype(np.uint8)).resize((cell, cell), Image.NEAREST)

    titles = ['image + expression', 'ground truth'] + [label for _, label in columns]
    width = len(titles) * (cell + pad) + pad
    height = head + len(items) * (cell + band) + pad
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad) + 2, 4), title, fill=(0, 0, 0), font=font)
    import textwrap
    for r, item in enumerate(items):
        y = head + r * (cell + band)
        rgb = ((item['image'] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        target = item['target']
        ref = refer.Refs[item['ref_id']]
        tiles = [tile(rgb, None, None), tile(rgb, target, (0, 255, 0))]
        captions = [textwrap.wrap(f'"{ref["sentences"][0]["raw"]}"', width=max(12, cell // 7))[:3], []]
        for key, _ in columns:
            pred = preds[key][r]
            inter = int((pred.bool() & target.bool()).sum())
            union = int((pred.bool() | target.bool()).sum())
            tiles.append(tile(rgb, pred, (255, 0, 0)))
            captions.append([f'IoU {inter / union:.2f}' if union else 'IoU -'])
        for c, (t, lines) in enumerate(zip(tiles, captions)):
            x = pad + c * (cell + pad)
            canvas.paste(t, (x, y))
            for k, line in enumerate(lines):
                draw.text((x + 2, y + cell + 2 + 14 * k), line, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_file(path) as tmp:
        canvas.save(tmp, format='PNG', optimize=True)
    return path


def figure_step(plan, manifests, share, samples, say):
    """The figure, redrawn only when the checkpoints it shows or its size changed (figure.json says what it
    was drawn from). A failure is one line; the table is written by then."""
    cfg = plan.cfg
    path = cfg.out / 'figure.png'
    prefix = f'acc{ratio_tag(share)}'
    sources = {name: manifests.result_ids.get(name) for name in
               (f'{prefix}-only-accurate', f'{prefix}-naive-wrel', f'{prefix}-lrb-stage3')}
    key = {'share': share, 'samples': samples, 'sources': sources}
    old = read_json(cfg.out / 'figure.json')
    if path.is_file() and old == key:
        say(f'figure: reused ({path})')
        return path
    try:
        make_figure(plan, share, path, samples)
    except Exception as e:  # noqa: BLE001 - the table is there; say what failed in one line
        raise InputError(f'figure: {type(e).__name__}: {e} (the table is in {cfg.out / "table.md"})') from None
    write_json(cfg.out / 'figure.json', key)
    say(f'figure: drawn ({path})')
    return path


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = validate(args)
    plan = Plan(cfg)
    say = Printer()
    if not cfg.is_leader:
        return follow(cfg, plan, say)

    data_digest = file_digest([cfg.data / args.dataset / f'refs({args.splitBy}).p',
                               cfg.data / args.dataset / 'instances.json'])
    manifests = Manifests(plan, data_digest)
    if args.fresh:
        clear_outputs(cfg)
    else:  # a finished or started step with another command line: refuse before anything runs
        for step in plan.steps:
            reason = manifests.refusal(step)
            if reason:
                raise InputError(reason)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / 'pipeline.json', {'command': [sys.executable, *sys.argv] if argv is None else argv,
                                           'args': vars(args), 'steps': [s.name for s in plan.steps],
                                           'started': now(), 'git': git_info()})
    start = time.time()
    trainings = sum(s.kind == 'train' for s in plan.steps)
    say(f'pipeline: {len(plan.steps)} steps ({trainings} trainings) for shares '
        f"{', '.join(ratio_tag(r) + ' %' for r in cfg.ratios)}{' and 100 %' if args.full else ''} in {cfg.out}")
    trivial = read_json(cfg.out / 'trivial.json')
    if not trivial or trivial.get('data') != data_digest:
        trivial = {'data': data_digest, **trivial_scores(cfg)}
        write_json(cfg.out / 'trivial.json', trivial)
    trivial = {split: trivial[split] for split in EVAL_SPLITS}
    table_state = {'written': False}

    def on_step_done(step):
        if step.kind == 'test':
            write_table(plan, trivial)
            table_state['written'] = True

    channel = PlanChannel(cfg) if args.nnodes > 1 else None
    ok = False
    try:
        execute(cfg, plan, manifests, say, on_step_done, channel)
        ok = True
    finally:
        if channel is not None:
            channel.close(ok)
    markdown = write_table(plan, trivial)
    figure = None
    if args.figure_samples:
        figure = figure_step(plan, manifests, min(cfg.ratios), args.figure_samples, say)
    print()
    print(markdown)
    say(f'pipeline finished in {hms(time.time() - start)}: {cfg.out / "table.md"}, {cfg.out / "table.json"}'
        + (f', figure {figure} (accurate share {ratio_tag(min(cfg.ratios))} %)' if figure else ''))
    return 0


def clear_outputs(cfg):
    """--fresh: every step's files go (the folder is a pipeline folder, checked by validate)."""
    for name in ('stages', 'splits', 'results', 'logs'):
        d = cfg.out / name
        if d.exists():
            trash = d.with_name(f'.{name}.old-{os.getpid()}')
            os.replace(d, trash)
            shutil.rmtree(trash)
    for name in ('table.md', 'table.json', 'figure.png', 'figure.json', 'trivial.json'):
        with_suppress(lambda: (cfg.out / name).unlink())


def cli():
    try:
        return utils.run_cli(main)
    except KeyboardInterrupt:  # a second Ctrl-C while run_cli reports the first
        sys.exit(130)


if __name__ == '__main__':
    cli()
