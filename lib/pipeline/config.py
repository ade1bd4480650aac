"""reproduce.py's command line: the flags (build_parser), their checks before anything runs (validate ->
Config), and the pipeline's constants (the methods, the table's columns, the flags it sets itself)."""
import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from lib import files
from utils import InputError, check_input_file

REPO = Path(__file__).resolve().parents[2]  # the repository root: the scripts the steps run (lib/pipeline/../..)
MODEL_ID = 'RMSIN'
DEFAULT_SEED = 2401  # the original's --seed
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
    g.add_argument('--seeds', '--seed', dest='seeds', type=int, nargs='+', default=[DEFAULT_SEED],
                   help='--seed of the trainings: each training of the table runs once per seed (each seed its own '
                        'step folders; the table shows mean ± sd over seeds)')
    g.add_argument('--amp', action='store_true', help='bf16 autocast on GPU')
    g.add_argument('--extra_args', default='',
                   help="more flags for every training and test script, e.g. '--mha 4-4-4-4 --cross_scale msda'")

    g = p.add_argument_group('launch')
    g.add_argument('--launcher', choices=('local', 'slurm'), default='local',
                   help='local: the steps run here, one node; slurm: every step is a SLURM job (submitit), '
                        'submitted at once with dependencies')
    g.add_argument('--device', default='auto', help="auto (GPU when there is one), cuda or cpu")
    g.add_argument('--nproc_per_node', type=int, default=1,
                   help='processes (GPUs) per node of a training; locally 1 runs plain python, more torchrun')
    g.add_argument('--torchrun_args', default='', help="more torchrun flags (local), e.g. '--rdzv_conf timeout=1800'")
    g.add_argument('--jobs', type=int, default=1,
                   help='steps run at the same time (CPU with --launcher local only; e.g. Naive-WREL beside '
                        'the LRB chain)')
    g.add_argument('--workers', type=int, default=4, help='data-loading workers of every script')
    g.add_argument('--print_freq', type=int, default=10, help='--print-freq of the training scripts')
    g.add_argument('--progress_every', type=float, default=60,
                   help='seconds between progress lines inside an epoch')

    g = p.add_argument_group('SLURM (--launcher slurm)')
    g.add_argument('--slurm_partition', default=None, help='partition of every job (default: the cluster default)')
    g.add_argument('--slurm_account', default=None, help='sbatch --account')
    g.add_argument('--slurm_qos', default=None, help='sbatch --qos')
    g.add_argument('--slurm_time', type=int, default=24 * 60,
                   help='time limit of each job in minutes; a job that reaches it is requeued and continues '
                        'from its last checkpoint')
    g.add_argument('--slurm_nodes', type=int, default=1, help='nodes per training (--nproc_per_node GPUs each)')
    g.add_argument('--slurm_cpus_per_task', type=int, default=None,
                   help='CPUs per process (default: --workers + 1, the loader workers and the process itself)')
    g.add_argument('--slurm_mem', default=None, help="sbatch --mem per node, e.g. '64G' (default: the cluster's)")
    g.add_argument('--slurm_signal_delay', type=int, default=120,
                   help='seconds before the time limit at which a job is told to stop and requeue itself')
    g.add_argument('--slurm_max_requeues', type=int, default=3, help='requeues after a time limit, per job')
    g.add_argument('--slurm_args', default='',
                   help="any other sbatch options, e.g. '--constraint=a100 --exclude=node7'")
    g.add_argument('--follow', action=argparse.BooleanOptionalAction, default=True,
                   help="follow the jobs until the table is written (Ctrl-C detaches; the jobs run on); "
                        "--no-follow: submit and exit")
    g.add_argument('--cancel', action='store_true', help="cancel this pipeline's SLURM jobs and exit")
    g.add_argument('--poll', type=float, default=30, help='seconds between looks at the jobs while following')
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
        self.extra = split_flags(args.extra_args, '--extra_args')
        self.torchrun_extra = split_flags(args.torchrun_args, '--torchrun_args')
        self.tokenizer = args.bert_tokenizer or args.ck_bert
        self.seeds = list(args.seeds)
        self.python = sys.executable
        self.slurm = args.launcher == 'slurm'
        self.slurm_extra = split_flags(args.slurm_args, '--slurm_args')

    @property
    def nodes(self):
        return self.args.slurm_nodes if self.slurm else 1

    @property
    def world(self):
        return self.args.nproc_per_node * self.nodes


def visible_gpus():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def split_flags(text, flag):
    """Shell-style split of a flag holding other flags; an unbalanced quote is one line naming `flag`."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise InputError(f'{flag} {text!r}: cannot split it like a shell would ({e})') from None


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
                      ('nproc_per_node', 1), ('jobs', 1), ('figure_samples', 0), ('print_freq', 1),
                      ('slurm_time', 1), ('slurm_nodes', 1), ('slurm_signal_delay', 0), ('slurm_max_requeues', 0)):
        if getattr(args, flag) < low:
            raise InputError(f'--{flag} {getattr(args, flag)}: must be >= {low}')
    if args.img_size < 32 or args.img_size % 32:
        raise InputError(f'--img_size {args.img_size}: must be a positive multiple of 32')
    if args.slurm_cpus_per_task is not None and args.slurm_cpus_per_task < 1:
        raise InputError(f'--slurm_cpus_per_task {args.slurm_cpus_per_task}: must be >= 1')
    if not (math.isfinite(args.poll) and args.poll > 0):
        raise InputError(f'--poll {args.poll}: must be a number of seconds > 0')
    if len(set(args.seeds)) != len(args.seeds):
        twice = next(s for s in args.seeds if args.seeds.count(s) > 1)
        raise InputError(f'--seeds: {twice} is given twice')

    cfg = Config(args)
    if args.batch_size % cfg.world:
        raise InputError(f'--batch_size {args.batch_size}: not divisible by the {cfg.world} processes '
                         f"(--nproc_per_node{' x --slurm_nodes' if cfg.slurm else ''})")
    if not cfg.slurm:
        for flag in ('slurm_partition', 'slurm_account', 'slurm_qos', 'slurm_mem', 'slurm_args'):
            if getattr(args, flag):
                raise InputError(f'--{flag}: only with --launcher slurm')
        if args.slurm_nodes != 1:
            raise InputError('--slurm_nodes: only with --launcher slurm (locally reproduce.py runs on one node; '
                             'for several nodes without SLURM start one torchrun per node yourself, see '
                             'docs/training.md)')
        if args.cancel or not args.follow:
            raise InputError(f"--{'cancel' if args.cancel else 'no-follow'}: only with --launcher slurm")
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
    if args.pretrained_swin_weights:
        check_input_file(args.pretrained_swin_weights, '--pretrained_swin_weights',
                         hint="download swin_base_patch4_window12_384_22k.pth, or pass '' for random initialisation")
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
    if cfg.slurm:  # the GPUs are on the compute nodes, not here: auto means GPU jobs
        cfg.device = 'cuda' if args.device == 'auto' else args.device
    else:
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
    if args.jobs > 1 and (cfg.device != 'cpu' or cfg.slurm):
        raise InputError(f'--jobs {args.jobs}: steps can run side by side only on CPU with --launcher local '
                         f'(on GPUs each step uses all --nproc_per_node of them; SLURM runs jobs side by side)')
    # output folder
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f'--output_dir {args.output_dir}: is a file')
    if cfg.out.is_dir() and any(cfg.out.iterdir()) and not (cfg.out / 'pipeline.json').is_file():
        raise InputError(f'--output_dir {args.output_dir}: holds files but no pipeline.json, so it is not a '
                         f'reproduce.py folder; choose a new or empty folder')
    files.check_writable_dir(cfg.out, '--output_dir')
    return cfg
