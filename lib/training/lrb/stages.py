"""LRB-WREL stages 2 and 3: the step functions and hooks the stage scripts hand to `engine.fit`, and what
the two scripts share before their first step (flag checks, --resume as teacher or continuation, the
run-folder guard).

- `Stage2Bank`: only the bank learns, through the frozen teacher.
- `Stage3Joint`: the bank's inner loop through the EMA teacher, the student's step, the EMA update.
"""
import torch

from lib.files import guard_run_dir
from utils import InputError, unwrap_module as unwrap

from ..checkpoint import load_checkpoint
from ..launch import start_run, validate_training_args
from ..step import autocast
from .bank import filled_text_features, sync_bank_grad_
from .schedule import bank_step_plan, ema_momentum, ema_update_


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
    guard_run_dir(args.output_dir, stage_file_names(stage, args.model_id),
                  resume=args.resume if resuming else '', overwrite=args.overwrite,
                  resume_hint=f'model_last_{args.model_id}.pth')


def checkpoint_stage(checkpoint):
    """2 or 3 for this codebase's stage-2 / stage-3 training checkpoints (resumable), else None."""
    return checkpoint.get('lrb_stage') if isinstance(checkpoint, dict) else None


def check_lavt(args):
    if args.model != 'lavt':
        raise InputError(f'--model {args.model}: the reference bank fills the separate BERT\'s input, so the LRB '
                         f'stages need --model lavt (as the original)')


def validate_stage_args(args, stage):
    """Flag checks of a stage script (before any process group) -> per-process batch size."""
    batch_size = validate_training_args(args)
    if not args.resume:
        starts = 'the teacher' if stage == 2 else 'student and teacher start from it'
        raise InputError(f'--resume: give the stage-1 checkpoint ({starts}, e.g. model_epoch_15.pth) or a '
                         f'stage-{stage} model_last_<id>.pth to continue')
    check_lavt(args)
    return batch_size


def open_stage_run(args, env, batch_size, stage):
    """Logging and seeding, --resume loaded, the run folder guarded -> (checkpoint, resuming: --resume is a
    checkpoint of this stage to continue, not the stage-1 teacher)."""
    start_run(args, env, batch_size)
    checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)
    resuming = checkpoint_stage(checkpoint) == stage
    check_stage_keys(checkpoint, args.resume, stage if resuming else None)
    guard_stage_run(args, stage, resuming)
    return checkpoint, resuming


# what the stage scripts read from --resume: a stage-1 teacher (None) or a stage-2 / stage-3 run to continue
STAGE_KEYS = {
    None: ('model', 'bert_model'),
    2: ('model', 'bert_model', 'caption_bank', 'optimizer', 'lr_scheduler', 'epoch'),
    3: ('student_model', 'bert_model', 'teacher_model', 'caption_bank', 'optimizer', 'lr_scheduler',
        'bank_optimizer', 'bank_lr_scheduler', 'epoch'),
}


def check_stage_keys(checkpoint, path, stage):
    """One line naming the first key of STAGE_KEYS[stage] that --resume lacks, before anything is built."""
    if not isinstance(checkpoint, dict):
        raise InputError(f'--resume {path}: not a checkpoint dictionary ({type(checkpoint).__name__})')
    what = f'a stage-{stage} checkpoint to continue' if stage else 'the stage-1 teacher checkpoint'
    for key in STAGE_KEYS[stage]:
        if key not in checkpoint:
            has = sorted(map(str, checkpoint))
            raise InputError(f"--resume {path}: no '{key}' entry, which {what} needs (has: "
                             f"{', '.join(has[:12]) + (', ...' if len(has) > 12 else '') or 'nothing'})")


def bank_predict_fn(model, bert, bank, amp=False):
    """Evaluation forward with the bank filling the weak samples (stage 2's selection metric)."""
    def predict(batch):
        with autocast(batch['image'].device, amp):
            l_feats, l_mask = filled_text_features(bert, bank, batch)
            return model(batch['image'], l_feats, l_mask)
    return predict


def bank_inputs(bank, batch):
    """(image, input_ids, attention_mask, target, rows): rows = the batch's bank rows (-1: not in the bank),
    looked up on the host (no device sync) and sent to the batch's device."""
    rows = bank.lookup(batch['ref_id']).to(batch['image'].device, non_blocking=True)
    return batch['image'], batch['input_ids'], batch['attention_mask'], batch['target'], rows


class Stage2Bank:
    """Stage 2: only the bank learns, through a frozen teacher (RMSIN + BERT). A step of
    lib/training/step.py: `inputs(batch)`, `loss(*inputs)` (one graph under --compile)."""

    def __init__(self, model, bert, bank, criterion):
        self.model, self.bert, self.bank, self.criterion = model, bert, bank, criterion

    def inputs(self, batch):
        return bank_inputs(self.bank, batch)

    def loss(self, image, input_ids, attention_mask, target, rows):
        l_feats, l_mask = filled_text_features(self.bert, self.bank, dict(input_ids=input_ids,
                                               attention_mask=attention_mask), rows=rows)
        return self.criterion(self.model(image, l_feats, l_mask), target)

    def __call__(self, batch):
        return self.loss(*self.inputs(batch))

    def after_backward(self, i, batch):
        sync_bank_grad_(self.bank.embedding.grad, self.bank.lookup(batch['ref_id']))


class Stage3Joint:
    """Stage 3: per iteration, the bank's inner loop through the frozen EMA teacher (on the batch's weak
    samples, at the planned iterations), then the student's step on the whole batch with weak rows
    filled from the bank (no gradient to it), then the teacher's EMA update. A step of
    lib/training/step.py for the student (`inputs`, `loss`); `bank_loss` takes the same inputs."""

    LOSSES = ('loss', 'bank_loss')  # what --compile compiles, each as one graph

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
        self.graphed_bank_update = None  # --cuda_graphs: bank_update as a replayed CUDA graph
        self.autocast_cache = True  # False while a CUDA graph is captured

    def on_epoch_start(self, epoch):
        self.epoch = epoch
        self.plan = bank_step_plan(self.is_weak, self.batch_size, self.world_size, self.seed, epoch,
                                   self.update_every)

    def inputs(self, batch):
        return bank_inputs(self.bank, batch)

    def bank_loss(self, image, input_ids, attention_mask, target, rows):
        """The teacher's loss on the batch's weak samples (rows >= 0), as a function of the bank.

        Static shapes: teacher and BERT run on the whole batch (both in eval mode, so each sample's forward
        is its own) and the loss keeps the weak samples (`SegmentationLoss.masked`: the loss of the weak
        subset, as the original computes it). No data-dependent sizes, no device sync, no branch.
        """
        with autocast(image.device, self.amp, cache=self.autocast_cache):
            l_feats, l_mask = filled_text_features(unwrap(self.bert), self.bank, dict(
                input_ids=input_ids, attention_mask=attention_mask), rows=rows)
            logits = self.teacher(image, l_feats, l_mask)
        return self.criterion.masked(logits, target, rows >= 0)

    def bank_grad(self, inputs, host_rows):
        """d(loss)/d(bank) on the batch's weak samples through the teacher; touches no other gradient."""
        if not bool((host_rows >= 0).any()):  # host tensor, no device sync. Another process has weak
            return torch.zeros_like(self.bank.embedding)  # samples: take the step with a zero gradient
        # only the bank's gradient: BERT's and the student's .grad stay untouched (no leak into their step)
        return torch.autograd.grad(self.bank_loss(*inputs), self.bank.embedding)[0]

    def bank_update(self, inputs, host_rows):
        """One bank step: its gradient (averaged over processes) and its optimizer step."""
        self.bank.embedding.grad = sync_bank_grad_(self.bank_grad(inputs, host_rows), host_rows)
        self.bank_optimizer.step()

    def before_step(self, i, batch):
        host_rows = self.bank.lookup(batch['ref_id'])
        if self.world_size == 1 and self.plan[i] != (bool((host_rows >= 0).any()) and i % self.update_every == 0):
            raise RuntimeError(f'bank step plan disagrees with batch {i} of epoch {self.epoch}')
        if not self.plan[i]:
            return
        inputs = self.inputs(batch)
        for _ in range(self.inner_steps):
            if self.graphed_bank_update is not None:
                self.graphed_bank_update(*inputs)
            else:
                self.bank_update(inputs, host_rows)
                self.bank_optimizer.zero_grad(set_to_none=True)
            self.bank_scheduler.step()
            self.bank_steps_taken += 1

    def loss(self, image, input_ids, attention_mask, target, rows):
        """The student's loss on the whole batch, weak samples filled from the bank (no gradient to it)."""
        l_feats, l_mask = filled_text_features(self.bert, self.bank, dict(
            input_ids=input_ids, attention_mask=attention_mask), detach=True, rows=rows)
        return self.criterion(self.student(image, l_feats, l_mask), target)

    def __call__(self, batch):
        return self.loss(*self.inputs(batch))

    def after_step(self, i, batch):
        ema_update_(self.teacher, self.student, ema_momentum(self.epoch, i, self.steps_per_epoch))
