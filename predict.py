"""Segment your own images from referring expressions with a trained checkpoint:

    python predict.py --resume CKPT --image a.jpg b.png --expression "the storage tank at the top left" \
        [--expression "the vehicle on the road" ...] --out DIR [--threshold 0.5] [--device cpu]

Checkpoints: those of train.py ('model'), of stage 3 ('student_model') and of the original code, with or
without `module.` prefixes, through the loader test.py uses (load_checkpoint + load_model_and_bert).

Model flags (--model, --swin_type, --img_size, --window12, --mha, --cross_scale, --ck_bert,
--bert_tokenizer) are read from the checkpoint's stored `args` when it has them; a flag given on the
command line wins. One log line says which value came from where. --device is not read from the
checkpoint: without it, the first GPU if there is one, else the CPU.

How an image is segmented (as the original LAVT demo does): the dataset's transform resizes it to
img_size x img_size (bilinear) and normalizes it; one forward; foreground where the argmax of the two
logits is 1 (as training and test.py), or where the foreground probability is > --threshold; the mask at
the model's resolution is brought back to the image's own size by nearest neighbour (pixel centres,
`nearest-exact`). Expressions are tokenized as in training: [CLS] ... [SEP], cut at 20 tokens (a warning
says what the model reads). EXIF orientation is applied, so masks fit the image as viewers show it.

No image forward is shared between expressions: RMSIN fuses the language into every stage of the visual
backbone (PWAM), so nothing before the decoder is independent of the expression. What is shared: each image
is decoded and resized once, and all (image, expression) pairs run through the network in batches of
--batch-size pairs.

Output in --out (built in a temporary folder and moved into place at the end, so the folder is complete or
untouched; a non-empty --out is refused unless --overwrite), for image i (file stem S; -2, -3, ... added until
the name is unused, ignoring case, when images share a stem) and expression j:
    S_e<j>_mask.png      binary mask at the image's size (0 background, 255 object)
    S_e<j>_overlay.png   the image, the mask in red, the expression written below it
    predictions.jsonl    one JSON line per pair, also printed on stdout once --out is in place:
                         image, expression, mask, overlay, width, height, area (pixels), bbox ([x, y, w, h]
                         as COCO, null when empty), mean_probability (mean foreground probability over the
                         mask, null when empty), tokens, truncated
"""
import argparse
import json
import logging
from pathlib import Path

import utils
from lib.files import atomic_output_dir, write_text_atomic
from lib.inference import (MODEL_FLAGS, Predictor, build, open_image, predict_all, resolve_model_flags,
                           stored_model_flags, warn_truncated)
from lib.training.checkpoint import load_checkpoint, pick_model_state
from lib.training.distributed import init_distributed, launch_world_size, setup_logging

logger = logging.getLogger('lrb')

_UNSET = object()


def get_parser():
    """The shared parser plus the flags of predict.py."""
    parser = utils.get_parser()
    parser.description = 'Segment your own images from referring expressions with a trained checkpoint'
    group = parser.add_argument_group('predict.py')
    group.add_argument('--image', nargs='+', action='extend', default=[], metavar='IMG',
                       help='image file(s), any size and aspect ratio')
    group.add_argument('--expression', action='append', default=[], metavar='TEXT',
                       help='referring expression (repeat the flag for several); every image gets every one')
    group.add_argument('--out', default='', help='output folder for masks, overlays and predictions.jsonl')
    if '--overwrite' not in parser._option_string_actions:  # the shared parser may already have it
        group.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    group.add_argument('--threshold', type=float, default=None,
                       help='foreground where its probability is > this (default: argmax, as training)')
    return parser


def parse_args(argv=None):
    """-> (args, names of the flags given on the command line)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    # a second parse on a namespace pre-filled with a marker: argparse sets defaults only for missing
    # attributes, so a flag that still holds the marker was not given
    marked = argparse.Namespace(**{name: _UNSET for name in MODEL_FLAGS + ('device',)})
    given = {k for k, v in vars(parser.parse_args(argv, namespace=marked)).items() if v is not _UNSET}
    return args, given


# --- validation -------------------------------------------------------------------------------

def validate_args(args):
    """Checks that need neither the checkpoint nor the model."""
    utils.check_flag_values(args, ('batch_size',))  # --img_size once the checkpoint's args are known
    utils.check_input_file(args.resume, '--resume')
    if not args.image:
        raise utils.InputError('--image: give at least one image')
    if not args.expression:
        raise utils.InputError('--expression: give at least one expression')
    if not args.out:
        raise utils.InputError('--out: give the folder for masks, overlays and predictions.jsonl')
    for j, text in enumerate(args.expression):
        if not text.strip():
            raise utils.InputError(f'--expression {j + 1} of {len(args.expression)}: empty')
    if args.threshold is not None and not (0.0 <= args.threshold < 1.0):
        raise utils.InputError(f'--threshold {args.threshold}: must be in [0, 1)')
    if launch_world_size() > 1:
        raise utils.InputError('predict.py runs in one process: start it with python, not torchrun')
    for path in args.image:
        open_image(path, decode=False)  # decoding happens batch by batch


def validate_model_flags(args):
    if not isinstance(args.img_size, int):
        raise utils.InputError(f'--img_size {args.img_size!r}: must be a positive multiple of 32')
    utils.check_flag_values(args, ('img_size',))


def main(argv=None):
    args, given = parse_args(argv)
    validate_args(args)
    setup_logging(0)
    return run(args, given)


def run(args, given):
    with atomic_output_dir(args.out, args.overwrite, '--out') as tmp:
        checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)
        pick_model_state(checkpoint, args.weights_key, args.resume)  # fail before building anything
        stored = stored_model_flags(checkpoint)
        logger.info(resolve_model_flags(args, given, stored))
        validate_model_flags(args)
        env = init_distributed(args.device)
        try:
            tokenizer, model, bert, key = build(args, checkpoint)
        except utils.InputError as e:
            from_ckpt = [f for f in ('ck_bert', 'bert_tokenizer') if f in stored and f not in given]
            if from_ckpt and 'BERT' in str(e):
                raise utils.InputError(f'{e} ({" and ".join(from_ckpt)} came from the checkpoint\'s stored args; '
                                       f'pass --{" / --".join(from_ckpt)} to point at the BERT folder)') from None
            raise
        del checkpoint
        model.to(env.device)
        if bert is not None:
            bert.to(env.device)
        logger.info(f"{args.resume} ('{key}'): {len(args.image)} image(s) x {len(args.expression)} expression(s) "
                    f'on {env.device}, {args.img_size} px, batches of {args.batch_size} pairs')
        predictor = Predictor(model, bert, tokenizer, args.img_size, env.device, args.threshold, args.amp)
        warn_truncated(predictor, args.expression, predictor.encode(args.expression)[2])
        records = predict_all(predictor, args.image, args.expression, Path(tmp), args.batch_size)
        lines = [json.dumps(r) for r in records]
        write_text_atomic(Path(tmp) / 'predictions.jsonl', ''.join(line + '\n' for line in lines))
    for line in lines:
        print(line, flush=True)
    logger.info(f'{len(records)} masks and overlays written to {args.out}')
    return records


if __name__ == '__main__':
    utils.run_cli(main)
