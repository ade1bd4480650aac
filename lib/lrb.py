"""The Learnable Reference Bank (LRB) of LRB-WREL and the machinery of its stages 2 and 3.

- `ReferenceBank`: one learnable tensor [N_weak, n_prompt, D] and a map ref_id -> row. `fill` puts a
  weak sample's rows 0, 1, ... into the padding slots of its class-name tokens (in order) and turns
  their attention mask on; accurate samples (ref ids not in the bank) pass unchanged. Vectorized over
  the batch. Files are the original's `caption_embeddings_<id>.pt` format:
  {'embedding': FloatTensor [N, n_prompt, D], 'sample_id_to_index': {ref_id: row}}.
- `sync_bank_grad_`: averages the bank's gradient over processes, as DDP would, but sends only the rows
  a batch touched (the dense gradient is ~0.7 GB at the 10 % setting).
- `ema_momentum`, `ema_update_`: the stage-3 teacher follows the student's parameters.
- `bank_step_plan`, `count_bank_steps`: which iterations run the stage-3 inner loop, decided from the
  samplers' indices of every process, so the bank schedule is exact and every process steps together.
- `Stage2Bank`, `Stage3Joint`: the hooks and step functions that the stage scripts hand to `engine.fit`.
"""
import logging
import os

import torch
import torch.nn as nn

import utils
from lib import distributed, engine
from utils import InputError

logger = logging.getLogger('lrb')

N_PROMPT = 20  # the reference's prompt length (= its token length, so every padding slot can be filled)
INIT_STD = 0.02


def stage_file_names(stage, model_id):
    """What a stage writes in --output-dir (what a new run must not replace silently)."""
    names = [f'model_last_{model_id}.pth']
    if stage == 2:
        return names + [f'caption_embeddings_{model_id}.pt']
    for metric in ('oIoU', 'mIoU'):
        names += [f'model_best_{metric}_{model_id}.pth', f'caption_embeddings_{model_id}_{metric}_best.pt']
    return names


def guard_stage_run(args, stage, resuming):
    """The run-folder guard of utils for a stage script, once --resume's content says whether it continues
    a run of this stage (then --resume is a continuation) or names the teacher (then it is not)."""
    utils.guard_run_dir(args.output_dir, stage_file_names(stage, args.model_id),
                        resume=args.resume if resuming else '', overwrite=args.overwrite,
                        resume_hint=f'model_last_{args.model_id}.pth')


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
            import torch.distributed as dist
            dist.broadcast(self.embedding.data, src=0)
        return self

    # --- files -------------------------------------------------------------------------------

    def state(self):
        """The original's file content (CPU tensors)."""
        return {'embedding': self.embedding.detach().cpu().clone(), 'sample_id_to_index': dict(self.sample_id_to_index)}

    def save(self, path):
        """Atomic torch.save of `state()` (rank 0 only); a failed write is one line naming the file."""
        if distributed.is_main_process():
            engine.save_checkpoint(self.state(), path, resumable=False)

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
        if not os.path.isfile(path):
            raise InputError(f'{flag} {path}: file not found')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
            raise InputError(f'{flag} {path}: not a readable reference bank ({type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else ""})') from None
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


# --- gradients across processes -----------------------------------------------------------------

def sync_bank_grad_(grad, rows):
    """Average the bank's gradient over processes in place, like DDP's all-reduce, sending only rows.

    grad [N, P, D] is this process's gradient, non-zero only at `rows` (int64 [B], -1 = none; B must be
    the same on every process). Collective: every process calls it at every bank step.
    """
    if not distributed.is_dist():
        return grad
    import torch.distributed as dist
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


# --- EMA teacher ------------------------------------------------------------------------------------

def ema_momentum(epoch, step, steps_per_epoch, final=0.9995):
    """The original's schedule over progress p = epoch + step / steps_per_epoch:
    0.95 -> 0.99 for p < 1, 0.99 -> 0.999 for 1 <= p < 3, then `final`."""
    progress = epoch + float(step) / max(1, int(steps_per_epoch))
    if progress < 1.0:
        return 0.95 + (0.99 - 0.95) * progress
    if progress < 3.0:
        return 0.99 + (0.999 - 0.99) * ((progress - 1.0) / 2.0)
    return final


@torch.no_grad()
def ema_update_(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters only (buffers stay)."""
    t = list(teacher.parameters())
    s = list(engine.unwrap(student).parameters())
    if len(t) != len(s):
        raise RuntimeError(f'EMA: teacher has {len(t)} parameters, student {len(s)}')
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


# --- which iterations run the bank's inner loop ------------------------------------------------------

def sampler_indices(num_samples, world_size, rank, seed, epoch):
    """The indices `engine.build_train_loader`'s DistributedSampler gives `rank` in `epoch`."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.int64)


def bank_step_plan(is_weak, batch_size, world_size, seed, epoch, update_every):
    """Per iteration of `epoch`: does any process's batch hold a weak sample, and is i % update_every 0?

    is_weak: bool [num_samples] by dataset index. Every process computes the same plan from the
    samplers' indices alone (no images, no communication), so all take the bank step together.
    """
    is_weak = torch.as_tensor(is_weak, dtype=torch.bool)
    any_weak = None
    for rank in range(world_size):
        indices = sampler_indices(len(is_weak), world_size, rank, seed, epoch)
        n_batches = len(indices) // batch_size  # drop_last, as the loader
        has = is_weak[indices[:n_batches * batch_size]].view(n_batches, batch_size).any(1)
        any_weak = has if any_weak is None else any_weak | has
    steps = torch.arange(len(any_weak)) % max(1, update_every) == 0
    return (any_weak & steps).tolist()


def count_bank_steps(is_weak, batch_size, world_size, seed, epochs, update_every, inner_steps):
    """Bank optimizer steps of a whole stage-3 run (the length of its poly schedule)."""
    return inner_steps * sum(sum(bank_step_plan(is_weak, batch_size, world_size, seed, e, update_every))
                             for e in range(epochs))


# --- stage hooks ---------------------------------------------------------------------------------------

def filled_text_features(bert, bank, batch, detach=False, rows=None):
    """BERT on the word embeddings with the bank's prompts in weak samples' padding -> (l_feats, l_mask)."""
    words = engine.text_encoder_of(None, bert).embeddings.word_embeddings(batch['input_ids'])  # [B, L, D]
    embeds, mask = bank.fill(batch['ref_id'], words, batch['attention_mask'], detach=detach, rows=rows)
    return engine.text_features(bert, None, mask, inputs_embeds=embeds)


def bank_predict_fn(model, bert, bank, amp=False):
    """Evaluation forward with the bank filling the weak samples (stage 2's selection metric)."""
    def predict(batch):
        with engine.autocast(batch['image'].device, amp):
            l_feats, l_mask = filled_text_features(bert, bank, batch)
            return model(batch['image'], l_feats, l_mask)
    return predict


class Stage2Bank:
    """Stage 2: only the bank learns, through a frozen teacher (RMSIN + BERT)."""

    def __init__(self, model, bert, bank, criterion):
        self.model, self.bert, self.bank, self.criterion = model, bert, bank, criterion

    def step(self, batch):
        l_feats, l_mask = filled_text_features(self.bert, self.bank, batch)
        return self.criterion(self.model(batch['image'], l_feats, l_mask), batch['target'])

    def after_backward(self, i, batch):
        sync_bank_grad_(self.bank.embedding.grad, self.bank.lookup(batch['ref_id']))


class Stage3Joint:
    """Stage 3: per iteration, the bank's inner loop through the frozen EMA teacher (on the batch's weak
    samples, at the planned iterations), then the student's step on the whole batch with weak rows
    filled from the bank (no gradient to it), then the teacher's EMA update."""

    def __init__(self, student, teacher, bert, bank, criterion, bank_optimizer, bank_scheduler, *, inner_steps,
                 update_every, is_weak, batch_size, world_size, seed, steps_per_epoch, amp=False):
        self.student, self.teacher, self.bert, self.bank = student, teacher, bert, bank
        self.criterion = criterion
        self.bank_optimizer, self.bank_scheduler = bank_optimizer, bank_scheduler
        self.inner_steps, self.update_every = inner_steps, update_every
        self.is_weak, self.batch_size, self.world_size, self.seed = is_weak, batch_size, world_size, seed
        self.steps_per_epoch, self.amp = steps_per_epoch, amp
        self.epoch, self.plan = 0, []
        self.bank_steps_taken = 0  # this run's bank optimizer steps (tests compare it with the count)

    def on_epoch_start(self, epoch):
        self.epoch = epoch
        self.plan = bank_step_plan(self.is_weak, self.batch_size, self.world_size, self.seed, epoch,
                                   self.update_every)

    def bank_grad(self, batch, rows):
        """d(loss)/d(bank) on the batch's weak samples through the teacher; touches no other gradient."""
        weak = (rows >= 0).nonzero().squeeze(1)  # host tensors: no device sync
        if len(weak) == 0:  # another process has weak samples: take the step with a zero gradient
            return torch.zeros_like(self.bank.embedding)
        index = weak.to(batch['image'].device, non_blocking=True)
        sub = {'ref_id': batch['ref_id'][weak], 'input_ids': batch['input_ids'].index_select(0, index),
               'attention_mask': batch['attention_mask'].index_select(0, index)}
        with engine.autocast(batch['image'].device, self.amp):
            l_feats, l_mask = filled_text_features(engine.unwrap(self.bert), self.bank, sub, rows=rows[weak])
            logits = self.teacher(batch['image'].index_select(0, index), l_feats, l_mask)
        loss = self.criterion(logits, batch['target'].index_select(0, index))
        # only the bank's gradient: BERT's and the student's .grad stay untouched (no leak into their step)
        return torch.autograd.grad(loss, self.bank.embedding)[0]

    def before_step(self, i, batch):
        local_rows = self.bank.lookup(batch['ref_id'])
        if self.world_size == 1 and self.plan[i] != (bool((local_rows >= 0).any()) and i % self.update_every == 0):
            raise RuntimeError(f'bank step plan disagrees with batch {i} of epoch {self.epoch}')
        if not self.plan[i]:
            return
        for _ in range(self.inner_steps):
            grad = sync_bank_grad_(self.bank_grad(batch, local_rows), local_rows)
            self.bank.embedding.grad = grad
            self.bank_optimizer.step()
            self.bank_scheduler.step()
            self.bank_optimizer.zero_grad(set_to_none=True)
            self.bank_steps_taken += 1

    def step(self, batch):
        l_feats, l_mask = filled_text_features(self.bert, self.bank, batch, detach=True)
        return self.criterion(self.student(batch['image'], l_feats, l_mask), batch['target'])

    def after_step(self, i, batch):
        ema_update_(self.teacher, self.student, ema_momentum(self.epoch, i, self.steps_per_epoch))


# --- script helpers ------------------------------------------------------------------------------------

def check_lavt(args):
    if args.model != 'lavt':
        raise InputError(f'--model {args.model}: the reference bank fills the separate BERT\'s input, so the LRB '
                         f'stages need --model lavt (as the original)')


def validate_stage_args(args, stage):
    """Flag checks of a stage script (before any process group) -> per-process batch size."""
    batch_size = engine.validate_training_args(args)
    if not args.resume:
        starts = 'the teacher' if stage == 2 else 'student and teacher start from it'
        raise InputError(f'--resume: give the stage-1 checkpoint ({starts}, e.g. model_epoch_15.pth) or a '
                         f'stage-{stage} model_last_<id>.pth to continue')
    check_lavt(args)
    return batch_size


def open_stage_run(args, env, batch_size, stage):
    """Logging and seeding, --resume loaded, the run folder guarded -> (checkpoint, resuming: --resume is a
    checkpoint of this stage to continue, not the stage-1 teacher)."""
    engine.start_run(args, env, batch_size)
    checkpoint = engine.load_checkpoint(args.resume, trust=args.trust_checkpoint)
    resuming = checkpoint_stage(checkpoint) == stage
    guard_stage_run(args, stage, resuming)
    return checkpoint, resuming


def checkpoint_stage(checkpoint):
    """2 or 3 for this codebase's stage-2 / stage-3 training checkpoints (resumable), else None."""
    return checkpoint.get('lrb_stage') if isinstance(checkpoint, dict) else None


def build_bank_optimizer(bank, lr, args):
    """AdamW on the whole bank tensor, as the original (weight decay reaches every row at every step);
    --wd, --amsgrad and --fused_adamw as for the model."""
    return engine.build_optimizer([{'params': [bank.embedding]}], args, lr=lr)


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
