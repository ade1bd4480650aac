"""RMSIN segmentation models and their factories.

lavt(pretrained, args)      -> LAVT:    model(image [B,3,H,W], l_feats [B,C_text,N], l_mask [B,N,1])
lavt_one(pretrained, args)  -> LAVTOne: model(image [B,3,H,W], input_ids [B,N], attention_mask [B,N])
Both return logits [B, 2, H, W]. `pretrained` is the official Swin weights file ('' = random init).
"""
import torch.nn.functional as F
from torch import nn

import utils
from .backbone import SWIN_PRESETS, MultiModalSwinTransformer
from .decoder import SimpleDecoding
from .pretrained import load_swin_pretrained

__all__ = ['lavt', 'lavt_one', 'LAVT', 'LAVTOne', 'build_backbone', 'parse_mha']


def parse_mha(mha, num_stages=4):
    """'--mha 4-4-4-4' -> [4, 4, 4, 4]; empty -> one PWAM head per stage."""
    if not mha:
        return [1] * num_stages
    try:
        heads = [int(a) for a in mha.split('-')]
    except ValueError:
        heads = []
    if len(heads) != num_stages or min(heads) < 1:
        raise utils.InputError(f'--mha {mha!r}: expected {num_stages} positive integers joined by "-", e.g. 1-1-1-1')
    return heads


def build_backbone(pretrained, args, text_dim):
    if args.swin_type not in SWIN_PRESETS:
        raise utils.InputError(f'--swin_type {args.swin_type!r}: choose one of {", ".join(SWIN_PRESETS)}')
    embed_dim, depths, num_heads = SWIN_PRESETS[args.swin_type]
    # window 12 for the 384-px Swin weights; args.window12 for test time, when weights come later
    window_size = 12 if 'window12' in (pretrained or '') or getattr(args, 'window12', False) else 7
    mha = parse_mha(getattr(args, 'mha', ''), len(depths))
    for i, heads in enumerate(mha):
        if (embed_dim * 2 ** i) % heads:
            raise utils.InputError(f'--mha {args.mha}: {heads} heads do not divide stage {i + 1} width '
                                   f'{embed_dim * 2 ** i} of swin {args.swin_type}')
    backbone = MultiModalSwinTransformer(
        embed_dim=embed_dim, depths=depths, num_heads=num_heads, text_dim=text_dim, window_size=window_size,
        img_size=getattr(args, 'img_size', 480), drop_path_rate=0.3, patch_norm=True, out_indices=(0, 1, 2, 3),
        num_heads_fusion=mha, fusion_drop=getattr(args, 'fusion_drop', 0.0),
        cross_scale=getattr(args, 'cross_scale', 'faithful'),
        use_checkpoint=getattr(args, 'checkpoint_activations', False))
    backbone.init_weights()
    if pretrained:
        print(f'Initializing Multi-modal Swin Transformer weights from {pretrained} (window size {window_size})')
        load_swin_pretrained(backbone, pretrained)
    elif getattr(args, 'resume', ''):  # test.py, train.py --resume: the checkpoint overwrites every weight
        print(f'Multi-modal Swin Transformer weights: from the checkpoint {args.resume} (loaded next)')
    else:
        print('Randomly initialize Multi-modal Swin Transformer weights.')
    return backbone


def _text_dim(args, text_dim):
    if text_dim is not None:
        return int(text_dim)
    from bert.encoder import load_text_config  # deferred: only when the width is not given
    return load_text_config(args.ck_bert).hidden_size


class LAVT(nn.Module):
    """Multi-modal Swin backbone + rotated-conv decoder; language features come from outside."""

    def __init__(self, backbone, classifier):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x, l_feats, l_mask):
        x_c1, x_c2, x_c3, x_c4 = self.backbone(x, l_feats, l_mask)
        logits = self.classifier(x_c4, x_c3, x_c2, x_c1)  # [B, 2, H/4, W/4]
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=True)


class LAVTOne(LAVT):
    """LAVT with its BERT inside: forward(image, input_ids [B, N], attention_mask [B, N])."""

    def __init__(self, backbone, classifier, text_encoder):
        super().__init__(backbone, classifier)
        self.text_encoder = text_encoder

    def forward(self, x, text, l_mask):
        if text.dim() != 2 or l_mask.shape != text.shape:
            raise utils.InputError(f'input_ids and attention_mask must both be [B, N], got {tuple(text.shape)} '
                                   f'and {tuple(l_mask.shape)}')
        from bert.encoder import encode
        l_feats = encode(self.text_encoder, l_mask, input_ids=text)  # [B, N, C_text]
        return super().forward(x, l_feats.permute(0, 2, 1), l_mask.unsqueeze(-1))


def lavt(pretrained='', args=None, text_dim=None):
    """RMSIN with an external BERT. text_dim None -> hidden_size of the BERT config at args.ck_bert."""
    backbone = build_backbone(pretrained, args, _text_dim(args, text_dim))
    decoder = SimpleDecoding(8 * backbone.embed_dim, channels_last=getattr(args, 'channels_last', False),
                             checkpoint_activations=getattr(args, 'checkpoint_activations', False))
    return LAVT(backbone, decoder)


def lavt_one(pretrained='', args=None, text_dim=None):
    """RMSIN with its BERT (from args.ck_bert) inside the model."""
    from bert.encoder import load_bert
    text_encoder = load_bert(args.ck_bert)
    hidden = text_encoder.config.hidden_size
    if text_dim is not None and int(text_dim) != hidden:
        raise utils.InputError(f'text_dim {text_dim} differs from the hidden size {hidden} of --ck_bert {args.ck_bert}')
    backbone = build_backbone(pretrained, args, hidden)
    decoder = SimpleDecoding(8 * backbone.embed_dim, channels_last=getattr(args, 'channels_last', False),
                             checkpoint_activations=getattr(args, 'checkpoint_activations', False))
    return LAVTOne(backbone, decoder, text_encoder)
