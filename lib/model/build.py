"""Building RMSIN from the command-line flags, and its forward pass for both model kinds.

- `build_model(args)`: RMSIN for `--model` (`lavt`: with the separate BERT, pooler removed; `lavt_one`: BERT
  inside), its Swin window taken from the checkpoint about to be loaded when that is window 12.
- `segment(model, bert, image, input_ids, attention_mask)`: one forward -> logits [B, 2, H, W].
- `text_features(bert, ...)`: the separate BERT's features in the layout RMSIN takes.
"""
import argparse
import logging

import torch

from bert.encoder import encode, load_bert
from utils import InputError, check_input_file, unwrap_module as unwrap

from . import segmentation

logger = logging.getLogger('lrb')


def checkpoint_window_size(checkpoint):
    """Swin window size of a checkpoint's visual weights, read from a relative-position table
    ((2w - 1)^2 rows), or None."""
    for key in ('model', 'student_model'):
        state = checkpoint.get(key) if isinstance(checkpoint, dict) else None
        for name, value in (state.items() if isinstance(state, dict) else ()):
            if name.endswith('relative_position_bias_table') and hasattr(value, 'shape'):
                return (round(value.shape[0] ** 0.5) + 1) // 2
    return None


def build_model(args, pretrained=None, checkpoint=None):
    """RMSIN for args.model; for 'lavt' also the separate BERT (pooler removed). -> (model, bert|None).

    checkpoint: the weights that will be loaded next; a window-12 checkpoint gets a window-12 Swin without
    --window12 (the original's stage scripts and test.py took the window from the weights file's name)."""
    if checkpoint is not None and checkpoint_window_size(checkpoint) == 12 and not args.window12:
        logger.info('Swin window size 12, as the checkpoint\'s weights')
        args = argparse.Namespace(**{**vars(args), 'window12': True})
    pretrained = args.pretrained_swin_weights if pretrained is None else pretrained
    if pretrained:
        check_input_file(pretrained, '--pretrained_swin_weights',
                         hint="pass --pretrained_swin_weights '' for random initialisation")
    if args.model == 'lavt':
        bert = load_bert(args.ck_bert)
        bert.pooler = None
        model = segmentation.lavt(pretrained, args, text_dim=bert.config.hidden_size)
        return model, bert
    if args.model == 'lavt_one':
        return segmentation.lavt_one(pretrained, args), None
    raise InputError(f"--model {args.model}: expected lavt or lavt_one")


def text_features(bert, input_ids, attention_mask=None, inputs_embeds=None):
    """Separate BERT -> l_feats [B, C, N] and l_mask [B, N, 1] as RMSIN takes them."""
    hidden = encode(bert, attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds)  # [B, N, C]
    return hidden.permute(0, 2, 1), attention_mask.unsqueeze(-1)


def segment(model, bert, image, input_ids, attention_mask):
    """One forward pass -> logits [B, 2, H, W] for both model kinds."""
    if bert is None:  # lavt_one: BERT inside the model
        return model(image, input_ids, attention_mask)
    l_feats, l_mask = text_features(bert, input_ids, attention_mask)
    return model(image, l_feats, l_mask)


def text_encoder_of(model, bert=None):
    return unwrap(bert) if bert is not None else unwrap(model).text_encoder


def dummy_forward(model, bert, img_size, device):
    """A one-sample forward (for `find_unused_parameters`)."""
    image = torch.zeros(1, 3, img_size, img_size, device=device)
    ids = torch.ones(1, 20, dtype=torch.long, device=device)
    mask = torch.zeros(1, 20, dtype=torch.long, device=device)
    mask[:, :2] = 1
    return lambda: segment(model, bert, image, ids, mask)
