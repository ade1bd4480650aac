"""The Learnable Reference Bank (LRB) of LRB-WREL.

- `ReferenceBank`: one learnable tensor [N_weak, n_prompt, D] and a map ref_id -> row. `fill` puts a
  weak sample's rows 0, 1, ... into the padding slots of its class-name tokens (in order) and turns
  their attention mask on; accurate samples (ref ids not in the bank) pass unchanged. Vectorized over
  the batch. Files are the original's `caption_embeddings_<id>.pt` format:
  {'embedding': FloatTensor [N, n_prompt, D], 'sample_id_to_index': {ref_id: row}}.
- `filled_text_features`: BERT's features of a batch with the bank filled in.
- `sync_bank_grad_`: averages the bank's gradient over processes, as DDP would, but sends only the rows
  a batch touched (the dense gradient is ~0.7 GB at the 10 % setting).
"""
import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from lib.model.build import text_encoder_of, text_features
from utils import InputError

from .. import distributed
from ..checkpoint import load_checkpoint, save_checkpoint
from ..optim import build_optimizer

logger = logging.getLogger('lrb')

N_PROMPT = 20  # the reference's prompt length (= its token length, so every padding slot can be filled)


INIT_STD = 0.02


def bank_path(output_dir, model_id, tag=''):
    """caption_embeddings_<id>.pt (stage 2) or caption_embeddings_<id>_<tag>.pt (stage 3's best banks)."""
    return os.path.join(output_dir, f'caption_embeddings_{model_id}{"_" + tag if tag else ""}.pt')


class ReferenceBank(nn.Module):
    """Learnable prompt embeddings, one [n_prompt, dim] block per weak ref id."""

    def __init__(self, ref_ids, n_prompt=N_PROMPT, dim=768, embedding=None):
        super().__init__()
        ids = [int(r) for r in ref_ids]
        if len(set(ids)) != len(ids):
            raise InputError('reference bank: duplicate ref ids')
        self.ref_ids = ids
        self.sample_id_to_index = {r: i for i, r in enumerate(ids)}
        if embedding is None:
            embedding = torch.empty(len(ids), n_prompt, dim)
            nn.init.normal_(embedding, std=INIT_STD)
        elif tuple(embedding.shape[:1]) != (len(ids),) or embedding.dim() != 3:
            raise InputError(f'reference bank: embedding of shape {tuple(embedding.shape)} for {len(ids)} ids')
        self.embedding = nn.Parameter(embedding.float())  # [N, P, D]
        # ref id -> row by binary search over the sorted ids: vectorized, on the host (no device sync)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self._sorted_ids = torch.tensor([ids[i] for i in order], dtype=torch.int64)
        self._sorted_rows = torch.tensor(order, dtype=torch.int64)

    @property
    def n_prompt(self):
        return self.embedding.shape[1]

    @property
    def dim(self):
        return self.embedding.shape[2]

    def __len__(self):
        return len(self.ref_ids)

    def extra_repr(self):
        return f'{len(self)} refs, n_prompt={self.n_prompt}, dim={self.dim}'

    def lookup(self, ref_ids):
        """Rows of `ref_ids` (int64 [B], on the host), -1 where an id is not in the bank."""
        ref_ids = torch.as_tensor(ref_ids, dtype=torch.int64).cpu().reshape(-1)
        if len(self) == 0:
            return torch.full_like(ref_ids, -1)
        pos = torch.searchsorted(self._sorted_ids, ref_ids).clamp(max=len(self) - 1)
        return torch.where(self._sorted_ids[pos] == ref_ids, self._sorted_rows[pos], -1)

    def fill(self, ref_ids, inputs_embeds, attention_mask, detach=False, rows=None):
        """-> (inputs_embeds, attention_mask) with the bank rows of weak samples in their padding slots.

        inputs_embeds [B, L, D] (BERT word embeddings of the token ids), attention_mask [B, L] (1 = token).
        The k-th padding slot (mask 0, left to right) of a weak sample gets its row k, for k < n_prompt,
        and mask 1. detach=True fills without a gradient to the bank (the student's step in stage 3).
        """
        if rows is None:
            rows = self.lookup(ref_ids)
        rows = rows.to(inputs_embeds.device, non_blocking=True)  # [B]
        if len(self) == 0:
            return inputs_embeds, attention_mask
        table = self.embedding.detach() if detach else self.embedding
        n_prompt, dim = table.shape[1], table.shape[2]
        pad = (attention_mask == 0) & (rows >= 0)[:, None]  # [B, L]
        slot = pad.long().cumsum(1) - 1  # k for the k-th padding slot of its row
        use = pad & (slot < n_prompt)
        prompts = table[rows.clamp(min=0)]  # [B, P, D]
        picked = prompts.gather(1, slot.clamp(0, n_prompt - 1).unsqueeze(-1).expand(-1, -1, dim))  # [B, L, D]
        embeds = torch.where(use.unsqueeze(-1), picked.to(inputs_embeds.dtype), inputs_embeds)
        mask = torch.where(use, torch.ones_like(attention_mask), attention_mask)
        return embeds, mask

    @torch.no_grad()
    def broadcast_(self):
        """Every process takes rank 0's bank (as DDP does with parameters): processes seed differently."""
        if distributed.is_dist():
                    dist.broadcast(self.embedding.data, src=0)
        return self

    # --- files -------------------------------------------------------------------------------

    def state(self):
        """The original's file content (CPU tensors)."""
        return {'embedding': self.embedding.detach().cpu().clone(), 'sample_id_to_index': dict(self.sample_id_to_index)}

    def save(self, path):
        """Atomic torch.save of `state()` (rank 0 only); a failed write is one line naming the file."""
        if distributed.is_main_process():
            save_checkpoint(self.state(), path, resumable=False)

    @classmethod
    def from_state(cls, state, source='reference bank'):
        """A bank from {'embedding', 'sample_id_to_index'}; rows follow the map's key order, as the
        original's stage 3 rebuilds it."""
        if not isinstance(state, dict) or not {'embedding', 'sample_id_to_index'} <= set(state):
            keys = ', '.join(sorted(map(str, state))) if isinstance(state, dict) else type(state).__name__
            raise InputError(f"{source}: not a reference bank (expected 'embedding' and 'sample_id_to_index'; "
                             f"has: {keys})")
        embedding, id_map = state['embedding'], state['sample_id_to_index']
        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 3 or not embedding.is_floating_point():
            raise InputError(f"{source}: 'embedding' must be a float tensor [N, n_prompt, dim]")
        if not isinstance(id_map, dict) or not id_map:
            raise InputError(f"{source}: 'sample_id_to_index' must be a non-empty {{ref_id: row}} map")
        try:
            ids = [int(k) for k in id_map]
            rows = torch.tensor([int(v) for v in id_map.values()], dtype=torch.int64)
        except (TypeError, ValueError):
            raise InputError(f"{source}: 'sample_id_to_index' must map integer ref ids to integer rows") from None
        if rows.min() < 0 or rows.max() >= embedding.shape[0]:
            raise InputError(f"{source}: 'sample_id_to_index' points to rows outside the "
                             f"{embedding.shape[0]}-row embedding")
        if torch.equal(rows, torch.arange(len(rows))) and len(rows) == embedding.shape[0]:
            table = embedding.clone()
        else:
            table = embedding[rows]
        return cls(ids, embedding=table)

    @classmethod
    def from_file(cls, path, flag='--caption_embedding_path'):
        if not path:
            raise InputError(f'{flag}: no reference bank given (stage 2 writes caption_embeddings_<id>.pt)')
        state = load_checkpoint(path, flag=flag)  # one-line errors: a directory, not a torch file, ...
        return cls.from_state(state, f'{flag} {path}')

    # --- checks ------------------------------------------------------------------------------

    def check_covers(self, dataset, source):
        """InputError unless every weak train ref of `dataset` has a row."""
        weak = weak_ref_ids(dataset)
        missing = sorted(set(weak) - set(self.sample_id_to_index))
        if missing:
            raise InputError(f'{source}: the bank has no rows for {len(missing)} of the {len(weak)} weak train '
                             f'refs of the data root (e.g. ref {missing[0]}); it was trained on another split')

    def check_dim(self, text_dim, source):
        if self.dim != text_dim:
            raise InputError(f'{source}: bank width {self.dim} differs from the BERT width {text_dim} '
                             f'(check --ck_bert)')


def weak_ref_ids(dataset):
    """Ref ids of `dataset` whose sentences are class names (weak expressions)."""
    weak = dataset.is_weak.tolist()
    return [ref_id for i, ref_id in enumerate(dataset.ref_ids) if any(weak[j] for j in dataset.sentence_rows(i))]


def filled_text_features(bert, bank, batch, detach=False, rows=None):
    """BERT on the word embeddings with the bank's prompts in weak samples' padding -> (l_feats, l_mask).
    batch: 'input_ids', 'attention_mask' and 'ref_id' (or the bank `rows` of the samples instead)."""
    words = text_encoder_of(None, bert).embeddings.word_embeddings(batch['input_ids'])  # [B, L, D]
    embeds, mask = bank.fill(batch['ref_id'] if rows is None else None, words, batch['attention_mask'], detach=detach, rows=rows)
    return text_features(bert, None, mask, inputs_embeds=embeds)


def sync_bank_grad_(grad, rows):
    """Average the bank's gradient over processes in place, like DDP's all-reduce, sending only rows.

    grad [N, P, D] is this process's gradient, non-zero only at `rows` (int64 [B], -1 = none; B must be
    the same on every process). Collective: every process calls it at every bank step.
    """
    if not distributed.is_dist():
        return grad
    rows = rows.to(grad.device)
    sorted_rows, _ = rows.sort()
    first = torch.ones_like(sorted_rows, dtype=torch.bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    rows = torch.where(first & (sorted_rows >= 0), sorted_rows, -1)  # each row once
    values = grad[rows.clamp(min=0)] * (rows >= 0).to(grad.dtype)[:, None, None]  # [B, P, D]
    world = distributed.get_world_size()
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_values, values)
    all_rows, all_values = torch.cat(all_rows), torch.cat(all_values)
    keep = all_rows >= 0
    grad.zero_()
    grad.index_add_(0, all_rows[keep], all_values[keep])
    return grad.div_(world)


def build_bank_optimizer(bank, lr, args):
    """AdamW on the whole bank tensor, as the original (weight decay reaches every row at every step);
    --wd, --amsgrad and --fused_adamw as for the model."""
    return build_optimizer([{'params': [bank.embedding]}], args, lr=lr)


def bank_checksum(bank):
    """Sums of the bank (float64) that differ when two copies differ."""
    e = bank.embedding.detach().double()
    weights = torch.arange(1, e.shape[0] + 1, dtype=torch.float64, device=e.device)
    return torch.stack([e.sum(), (e * e).sum(), (e.sum((1, 2)) * weights).sum()])


def check_bank_in_sync(bank):
    """Every process must hold the same bank (each averages the same gradients); a collective."""
    if not distributed.is_dist():
        return
    sums = distributed.all_gather_objects(bank_checksum(bank).cpu().tolist())
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f'reference bank differs between processes: checksums {sums}')
    logger.info(f'reference bank identical on all {len(sums)} processes (checksum {sums[0][0]:.6e})')
