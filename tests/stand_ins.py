"""Stand-in modules and batches for the training machinery's unit tests: the calling conventions of RMSIN
(`lavt`: model(image, l_feats, l_mask); `lavt_one`: model(image, input_ids, attention_mask)) at toy size,
and a tiny training set-up (param groups, AdamW, poly schedule) with a few supervised steps."""
import argparse
import random

import numpy as np
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel

from lib.model.build import text_features
from lib.training import engine
from lib.training.losses import build_criterion
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized


def tiny_bert(layers=12, hidden=16):
    cfg = BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    bert = BertModel(cfg, add_pooling_layer=False)
    bert.pooler = None
    return bert


class TinyBackbone(nn.Module):
    def __init__(self, text_dim=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 3, padding=1)
        self.norm0 = nn.LayerNorm(8)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(4, 2))
        self.text_proj = nn.Linear(text_dim, 8)

    def forward(self, x, l_feats, l_mask):
        v = self.patch_embed(x)  # [B, 8, H, W]
        w = (l_feats * l_mask.permute(0, 2, 1)).sum(-1) / l_mask.sum(1).clamp_min(1)  # [B, C]
        v = v + self.text_proj(w)[:, :, None, None]
        v = self.norm0(v.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + self.relative_position_bias_table.sum()
        return v


class TinyLavt(nn.Module):
    """Same calling convention as lib.model.segmentation.lavt: model(image, l_feats, l_mask)."""

    def __init__(self, text_dim=16):
        super().__init__()
        self.backbone = TinyBackbone(text_dim)
        self.classifier = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, image, l_feats, l_mask):
        return self.classifier(self.backbone(image, l_feats, l_mask))


class TinyLavtOne(TinyLavt):
    def __init__(self, layers=12):
        super().__init__()
        self.text_encoder = tiny_bert(layers)

    def forward(self, image, input_ids, attention_mask):
        l_feats, l_mask = text_features(self.text_encoder, input_ids, attention_mask)
        return super().forward(image, l_feats, l_mask)


def make_batch(b=2, s=16, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, n, dtype=torch.long)
    mask[:, :3] = 1
    return {'image': torch.randn(b, 3, s, s, generator=g),
            'target': (torch.rand(b, s, s, generator=g) > 0.6).long(),
            'input_ids': torch.randint(1, 30, (b, n), generator=g) * mask,
            'attention_mask': mask,
            'index': torch.arange(b), 'ref_id': torch.arange(b) + 100}


def opt_args(**kw):
    base = dict(lr=3e-5, weight_decay=0.01, amsgrad=False)
    base.update(kw)
    return argparse.Namespace(**base)


def run_steps(model, bert, opt, sched, steps, start=0):
    crit = build_criterion()
    step = engine.supervised_step(model, bert, crit)
    model.train()
    for i in range(start, start + steps):
        loss = step(make_batch(seed=i))
        # randomness consumed between steps, as augmentations would
        loss = loss + 0 * torch.rand(()) + 0 * float(np.random.rand()) + 0 * random.random()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def build_tiny_training(seed=0):
    torch.manual_seed(seed)
    model, bert = TinyLavt(), tiny_bert(2)
    groups = build_param_groups(model, bert)
    freeze_unoptimized({'model': model, 'bert': bert}, groups)
    opt = build_optimizer(groups, opt_args(lr=1e-2))
    return model, bert, opt, build_poly_scheduler(opt, 6)
