"""What every training script does before and around its run: flag checks, process set-up, seeding,
the opening log line, and the epoch this run stops before.

`launch(run, argv)` is the whole life of a training script: parse (utils.get_parser), validate (one-line
errors before any process group), set up the process(es) (torchrun or one process), run(args, env,
per-process batch size), tear down.
"""
import logging
import os

import utils
from utils import InputError

from . import distributed
from .cuda_graphs import check_cuda_graphs

logger = logging.getLogger('lrb')


def validate_training_args(args):
    """Flag checks of every training script, before any process group -> per-process batch size."""
    utils.check_flag_values(args)  # --lr nan, --epochs 0, --img_size 100, --caption_inner_steps 0, ...
    if args.resume:
        utils.check_input_file(args.resume, '--resume')  # missing, or a directory
    if not os.path.isdir(args.refer_data_root):
        raise InputError(f'--refer_data_root {args.refer_data_root}: no such directory')
    check_compile_backend(args)
    world_size = distributed.launch_world_size()
    check_cuda_graphs(args, world_size)
    return distributed.per_process_batch_size(args.batch_size, world_size)


def check_compile_backend(args):
    backend = getattr(args, 'compile', '')
    if backend:
        import torch._dynamo
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise InputError(f'--compile {backend}: unknown torch.compile backend (known: {", ".join(known)})')


def launch(run, argv=None, validate=validate_training_args):
    """Entry point of a training script: parse, validate flags, set up the process(es), run(args, env,
    per-process batch size), tear down."""
    args = utils.get_parser().parse_args(argv)
    batch_size = validate(args)
    env = distributed.init_distributed(args.device)
    try:
        return run(args, env, batch_size)
    finally:
        distributed.cleanup_distributed()


def start_run(args, env, batch_size):
    """Logging, seeding and the opening log line of a training run."""
    distributed.setup_logging(env.rank)
    if args.amp and env.device.type != 'cuda':
        logger.info('--amp is for GPUs; running in float32 on CPU')
    distributed.seed_everything(args.seed, env.rank)
    workers = distributed.per_process_workers(args.workers, env.world_size)
    logger.info(f'{env.world_size} process(es) on {env.device}; batch {batch_size} per process; '
                f'image size {args.img_size}; {workers} loader worker(s) per process'
                + (' (--workers auto)' if args.workers == 'auto' else ''))


def end_epoch(args, start_epoch):
    """The epoch this run stops before (--epochs, or earlier with --stop_after); None when a resumed
    checkpoint has already finished every epoch."""
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the checkpoint already finished epoch {start_epoch - 1} of {args.epochs}')
        return None
    return args.epochs if not args.stop_after else min(args.epochs, start_epoch + args.stop_after)
