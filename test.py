"""Evaluate a checkpoint on a split, as the original README:

    python test.py --swin_type base --dataset rrsisd --resume CKPT --split test --workers 4 --window12 --img_size 480

Loads checkpoints of train.py ('model'), of stage 3 ('student_model') and of the original code (with or
without DDP `module.` prefixes; for --model lavt also 'bert_model'). Prints overall IoU, mean IoU and
precision@0.5..0.9 over every sentence of the split and writes them to a JSON file, and beside it one
record per sentence (`<json stem>_records.npz`, lib/evaluation/records.py: what
`python -m lib.evaluation.compare` compares); --breakdown adds per-category and per-size tables
(`<json stem>_breakdown.md`). Under torchrun each process evaluates its share of the split; the reduced
numbers are the same as with one process.
"""
import json
import logging
import os

import utils
from lib.evaluation.breakdown import breakdown_markdown
from lib.evaluation.records import SentenceRecords, breakdown_path, records_path
from lib.files import check_writable_dir, guard_output_dir, guard_output_file, write_text_atomic
from lib.model.build import build_model
from lib.training.checkpoint import load_checkpoint, load_model_and_bert
from lib.training.data import build_eval_loader
from lib.training.distributed import cleanup_distributed, init_distributed, per_process_workers, setup_logging
from lib.training.engine import evaluate, predict_fn
from lib.training.metrics import format_results
from lib.training.visualize import OverlayWriter

logger = logging.getLogger('lrb')
OVERLAY_FILES = '[0-9][0-9][0-9][0-9][0-9]_s*.png'  # the names OverlayWriter gives its PNGs


def results_path(args):
    if args.results_json:
        return args.results_json
    stem = os.path.splitext(os.path.abspath(args.resume))[0]
    return f'{stem}_{args.dataset}_{args.split}_metrics.json'


def companion_paths(args):
    """The files written beside the metrics JSON: the records, and with --breakdown the tables."""
    out = results_path(args)
    return [records_path(out)] + ([breakdown_path(out)] if args.breakdown else [])


def build_parser():
    parser = utils.get_parser()
    parser.add_argument('--breakdown', action='store_true',
                        help='also write per-category and per-size tables with 95%% intervals '
                             '(<results json stem>_breakdown.md)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    env = init_distributed(args.device)
    try:
        return run(args, env)
    finally:
        cleanup_distributed()


def run(args, env):
    setup_logging(env.rank)
    if not args.resume:
        raise utils.InputError('--resume: give the checkpoint to test')
    utils.check_flag_values(args, ('workers', 'img_size', 'vis_num'))
    utils.check_input_file(args.resume, '--resume')
    if env.is_main:  # unwritable output paths fail now, not after the evaluation
        check_writable_dir(os.path.dirname(results_path(args)), '--results_json')
        if args.vis_dir:
            check_writable_dir(args.vis_dir, '--vis_dir')
    checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)

    from bert.encoder import load_tokenizer
    from refer.dataset import build_dataset
    tokenizer = load_tokenizer(args.bert_tokenizer)
    dataset = build_dataset(args, args.split, tokenizer, eval_mode=True)
    loader = build_eval_loader(dataset, per_process_workers(args.workers, env.world_size),
                               args.pin_mem, args.split)

    model, bert = build_model(args, pretrained='', checkpoint=checkpoint)
    key = load_model_and_bert(checkpoint, model, bert, key=args.weights_key, source=args.resume)
    del checkpoint
    model.to(env.device).eval()
    if bert is not None:
        bert.to(env.device).eval()
    logger.info(f"{args.resume} ('{key}'): {args.split} split, {len(dataset)} refs, "
                f'{env.world_size} process(es) on {env.device}')

    if env.is_main:  # earlier results are replaced only with --overwrite (checked once the model fits)
        guard_output_file(results_path(args), overwrite=args.overwrite, flag='--results_json')
        if args.vis_dir:
            guard_output_dir(args.vis_dir, [OVERLAY_FILES], overwrite=args.overwrite, flag='--vis_dir')
        for path in companion_paths(args):  # after the JSON and the overlays, whose messages users know
            guard_output_file(path, overwrite=args.overwrite, flag='--results_json')
    vis = OverlayWriter(args.vis_dir, args.vis_num, tokenizer) if args.vis_dir else None
    meter = evaluate(predict_fn(model, bert, args.amp), loader, env.device, desc='Test',
                     on_prediction=vis)
    summary = meter.summary()
    if env.is_main:
        print(format_results(summary), flush=True)
        out = results_path(args)
        meta = {'checkpoint': os.path.abspath(args.resume), 'weights_key': key, 'dataset': args.dataset,
                'split': args.split, 'model': args.model, 'swin_type': args.swin_type, 'img_size': args.img_size}
        records = SentenceRecords.from_meter(meter, dataset, meta)
        records.save(records_path(out))  # before the JSON: a finished JSON means its records exist
        if args.breakdown:
            name = os.path.splitext(os.path.basename(args.resume))[0]
            write_text_atomic(breakdown_path(out), breakdown_markdown({name: [records]}))
        write_text_atomic(out, json.dumps({**meta, 'processes': env.world_size, **summary,
                                           'sentences': [{'index': k[0], 'sentence': k[1], 'I': i, 'U': u}
                                                         for k, i, u, *_ in meter.records]}, indent=2))
        logger.info(f'metrics written to {out}, per-sentence records to {records_path(out)}'
                    + (f', breakdown to {breakdown_path(out)}' if args.breakdown else ''))
        if vis is not None:
            logger.info(f'overlays written to {args.vis_dir}')
    return summary


if __name__ == '__main__':
    utils.run_cli(main)
