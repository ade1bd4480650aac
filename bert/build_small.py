"""Build a small BERT offline: a WordPiece vocabulary built from a dataset's expressions, a small
`BertConfig` and random weights, written with `save_pretrained` so it loads through the same
`from_pretrained` path as bert-base-uncased (pass the directory to --ck_bert and --bert_tokenizer).

    python -m bert.build_small --refer_data_root ROOT --dataset rrsisd --out DIR [--overwrite]
"""
import argparse
import os
from collections import Counter
import string
import sys
import time

import torch
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

from refer.refer import IMAGE_DIRS, load_instances, load_refs
from lib.files import atomic_output_dir
from utils import InputError, run_cli

# [PAD] must be id 0: the dataset pads token ids with 0, as bert-base-uncased does.
SPECIAL_TOKENS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def collect_expressions(data_root, dataset='rrsisd', splitBy='unc'):
    """Every sentence of the refs file plus the category names of instances.json (when present)."""
    if dataset not in IMAGE_DIRS:
        raise InputError(f"unknown dataset '{dataset}' (--dataset); known: {', '.join(IMAGE_DIRS)}")
    if not os.path.isdir(data_root):
        raise InputError(f"data root '{data_root}' is not a directory (--refer_data_root)")
    data_dir = os.path.join(data_root, dataset)
    refs = load_refs(os.path.join(data_dir, f'refs({splitBy}).p'))
    expressions = [sent['raw'] for ref in refs for sent in ref['sentences']]
    instances_file = os.path.join(data_dir, 'instances.json')
    if os.path.isfile(instances_file):
        expressions += [cat['name'] for cat in load_instances(instances_file)['categories']]
    return expressions


def build_vocab(expressions, vocab_size=2000):
    """WordPiece vocabulary: the special tokens, every printable ASCII character as a word start and as
    a `##` continuation (so unseen words split into pieces instead of [UNK]), then the words of the
    expressions, most frequent first (ties alphabetical). Counted, not trained: the `tokenizers`
    trainer breaks merge ties in per-process hash order, so its vocabulary changes run to run."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    base = SPECIAL_TOKENS + chars + ['##' + c for c in chars]
    if vocab_size < len(base):
        raise InputError(f'--vocab_size {vocab_size}: must be at least {len(base)} (special tokens and characters)')
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for text in expressions
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    known = set(base)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    return base + words[:vocab_size - len(base)]


def build_small_bert(expressions, out_dir, hidden_size=64, num_hidden_layers=10, num_attention_heads=4,
                     intermediate_size=None, vocab_size=2000, max_position_embeddings=512, seed=0,
                     overwrite=False):
    """Write tokenizer + randomly initialised BertModel (no pooler) to `out_dir`; returns its config."""
    if not expressions:
        raise InputError('no expressions to train a vocabulary on')
    if hidden_size % num_attention_heads:
        raise InputError(f'hidden size {hidden_size} is not a multiple of {num_attention_heads} heads')
    with atomic_output_dir(out_dir, overwrite) as tmp:
        vocab_file = os.path.join(tmp, 'vocab.txt')
        with open(vocab_file, 'w', encoding='utf-8') as f:
            f.write('\n'.join(build_vocab(expressions, vocab_size)) + '\n')
        tokenizer = BertTokenizerFast(vocab=vocab_file, do_lower_case=True)
        assert tokenizer.pad_token_id == 0
        os.remove(vocab_file)
        tokenizer.save_pretrained(tmp)

        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            intermediate_size=intermediate_size or 4 * hidden_size,
                            max_position_embeddings=max_position_embeddings, pad_token_id=0)
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        model.save_pretrained(tmp)
    return config


def get_args_parser():
    parser = argparse.ArgumentParser(prog='python -m bert.build_small',
                                     description='Build a small BERT (vocabulary + random weights) offline.')
    parser.add_argument('--refer_data_root', required=True, help='REFER data root holding <dataset>/refs(<splitBy>).p')
    parser.add_argument('--dataset', default='rrsisd', help='rrsisd or res_lad')
    parser.add_argument('--splitBy', default='unc')
    parser.add_argument('--out', required=True, help='output directory (pass it to --ck_bert and --bert_tokenizer)')
    parser.add_argument('--hidden_size', type=int, default=64)
    parser.add_argument('--layers', type=int, default=10, help='encoder layers (the engine groups the first 10)')
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--vocab_size', type=int, default=2000, help='upper bound on the vocabulary size')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # a one-shard save needs no progress bar
    tic = time.time()
    expressions = collect_expressions(args.refer_data_root, args.dataset, args.splitBy)
    config = build_small_bert(expressions, args.out, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, vocab_size=args.vocab_size, seed=args.seed,
                              overwrite=args.overwrite)
    print(f'build_small: wrote BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}, '
          f'vocab {config.vocab_size}) trained on {len(expressions)} expressions to {args.out} '
          f'in {time.time() - tic:.1f}s', file=sys.stdout)


if __name__ == '__main__':
    run_cli(main)
