"""The text encoder: `transformers` BERT and its fast tokenizer, from a local directory or a hub name.

Nothing here changes global settings. When weights can't be found (no such directory and the hub is
unreachable, e.g. offline), loading raises `utils.InputError` with one line saying what to do.
The text width is `load_text_config(...).hidden_size` (768 for bert-base-uncased); never hard-code it.
"""
import os

from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from utils import InputError, unwrap_module


def _not_found(name_or_dir, reason=''):
    if os.path.isdir(name_or_dir):
        return InputError(f"cannot load BERT from '{name_or_dir}': the directory lacks a usable "
                          f"config/vocabulary/weights{reason}")
    return InputError(f"cannot load BERT from '{name_or_dir}': not a local directory with config/weights "
                      'and the hub is unreachable; download bert-base-uncased and pass its directory '
                      'to --ck_bert/--bert_tokenizer')


def _load(loader, name_or_dir, **kwargs):
    name_or_dir = os.fspath(name_or_dir)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise in logs
    try:
        return loader(name_or_dir, **kwargs)
    except (OSError, ValueError) as e:  # missing files, unreachable hub, invalid repo id
        raise _not_found(name_or_dir, f' ({str(e).splitlines()[0]})') from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_dir):
    """Fast (Rust) WordPiece tokenizer."""
    tokenizer = _load(BertTokenizerFast.from_pretrained, name_or_dir)
    # transformers 5 quietly returns a tokenizer with only special tokens when no vocabulary is found
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise _not_found(os.fspath(name_or_dir), ' (no vocabulary)')
    return tokenizer


def load_text_config(name_or_dir):
    name_or_dir = os.fspath(name_or_dir)
    # transformers 5 returns a default (768-wide) config for a local directory without config.json
    if os.path.isdir(name_or_dir) and not os.path.isfile(os.path.join(name_or_dir, 'config.json')):
        raise _not_found(name_or_dir, ' (no config.json)')
    return _load(BertConfig.from_pretrained, name_or_dir)


def load_bert(name_or_dir):
    """BertModel without its pooler (`pooler = None`, as the reference): only token features are used."""
    model = _load(BertModel.from_pretrained, name_or_dir, add_pooling_layer=False)
    model.pooler = None
    return model


def encode(bert, attention_mask, input_ids=None, inputs_embeds=None):
    """Token features [B, N, C] of `bert` (a BertModel, bare or wrapped by DDP / torch.compile) for
    `input_ids` or `inputs_embeds`, with the padding mask [B, N] given to it already expanded into the 4-D
    mask of its attention implementation. Given the 2-D mask, transformers would ask the device whether
    any token is padded (to drop the mask when none is), a host synchronisation on every call; the
    features are the same up to the attention kernel's rounding."""
    if attention_mask is not None and attention_mask.dim() == 2:
        base = unwrap_module(bert)
        shape = (*attention_mask.shape, 0)  # only its batch size, length, dtype and device are read
        like = attention_mask.new_empty(shape, dtype=base.get_input_embeddings().weight.dtype)
        attention_mask = create_bidirectional_mask(config=base.config, inputs_embeds=like, attention_mask=attention_mask,
                                                   allow_is_bidirectional_skip=False)
    return bert(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]
