"""The training and evaluation loops shared by every training script and test.py.

- `train_one_epoch(step_fn, ...)`: one pass; step_fn(batch) -> loss, backward, optimizer and schedule;
  hooks where the LRB stages plug in.
- `evaluate(predict, ...)`: every sentence of every ref -> the metrics, reduced over processes.
- `fit(...)`: epochs of train + evaluate + save; a stage script hands in its own step, predict and save.

Epochs are numbered from 0 and the checkpoint's `epoch` is the last finished one (reference layout).
"""
import datetime
import logging
import math
import time

import torch
from tqdm import tqdm

from lib.model.build import segment
from refer.transforms import finish_batch
from utils import InputError

from . import distributed
from .metrics import RefSegMeter, format_results, tensor_keys
from .step import EagerUpdate, SupervisedStep, autocast

logger = logging.getLogger('lrb')


HOST_KEYS = ('ref_id', 'index')  # ids stay on the host: lookups on them need no device sync


def to_device(batch, device):
    """The batch's tensors on `device` (ids stay on the host); uint8 train items made float32 / int64 there."""
    non_blocking = device.type == 'cuda'
    return finish_batch({k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor)
                             and k not in HOST_KEYS else v) for k, v in batch.items()})


def supervised_step(model, bert, criterion):
    """The stage-1 step: batch -> loss (`SupervisedStep`)."""
    return SupervisedStep(model, bert, criterion)


def _progress(iterable, desc, total=None):
    # bars only on rank 0 and only on a terminal (disable=None), so logs stay readable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False,
                disable=None if distributed.is_main_process() else True)


def train_one_epoch(step_fn, loader, optimizer, lr_scheduler, epoch, *, device, print_freq=10,
                    amp=False, before_step=None, after_backward=None, after_step=None, writer=None,
                    global_step=0, update=None):
    """One pass over `loader`: step_fn(batch) -> loss; backward; optimizer and per-iteration schedule.

    Hooks (the LRB stages plug in here; stage 1 uses none):
      before_step(i, batch)   before the forward, e.g. the reference bank's inner loop in stage 3
      after_backward(i, batch) between backward and optimizer step, e.g. syncing the bank's gradient
      after_step(i, batch)    after the optimizer step, e.g. the EMA teacher update
    update(i, batch) -> loss does forward, backward and the optimizer step (default: `EagerUpdate` of
    step_fn, optimizer and after_backward; `cuda_graphs.GraphedUpdate` replays them as one CUDA graph).
    Modes (train/eval) of the modules are the caller's business. Returns the mean loss.
    No host synchronisation per iteration: the loss is read back only every `print_freq` steps, and a
    non-finite one then stops the run (InputError naming the epoch and the first such iteration), before
    any checkpoint of this epoch is written.
    """
    num_iters = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_n = 0
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first iteration of a non-finite loss
    if update is None:
        update = EagerUpdate(step_fn, optimizer, device=device, amp=amp, after_backward=after_backward)
    start = time.time()
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(_progress(loader, f'Epoch {epoch}', num_iters)):
        batch = to_device(batch, device)
        if before_step is not None:
            before_step(i, batch)
        loss = update(i, batch)
        lr_scheduler.step()
        if after_step is not None:
            after_step(i, batch)
        loss_sum += loss
        window_sum += loss
        window_n += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)  # on the device
        if (i + 1) % max(1, print_freq) == 0 or i + 1 == num_iters:
            lr = float(optimizer.param_groups[0]['lr'])  # a device tensor under --cuda_graphs
            avg = window_sum.item() / window_n
            if not math.isfinite(avg):
                raise InputError(f'the training loss is not finite ({avg}) at epoch {epoch}, iteration '
                                 f'{int(first_bad) + 1}/{num_iters}: the run diverged and this epoch is not saved '
                                 f'(try a lower --lr)')
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (num_iters - i - 1)
            logger.info(f'Epoch: [{epoch}] [{i + 1}/{num_iters}] loss: {avg:.4f} lr: {lr:.3e} '
                        f'time/it: {elapsed / (i + 1):.3f}s eta: {datetime.timedelta(seconds=int(eta))}')
            if writer is not None:
                writer.add_scalar('train/loss', avg, global_step + i + 1)
                writer.add_scalar('train/lr', lr, global_step + i + 1)
            window_sum.zero_()
            window_n = 0
    if num_iters == 0:
        return float('nan')
    return loss_sum.item() / num_iters


def predict_fn(model, bert, amp=False):
    """Evaluation forward: sentence batch -> logits."""
    def predict(batch):
        with autocast(batch['image'].device, amp):
            return segment(model, bert, batch['image'], batch['input_ids'], batch['attention_mask'])
    return predict


@torch.no_grad()
def evaluate(predict, loader, device, *, desc='Test', on_prediction=None):
    """Every sentence of every item: input_ids [B, K, N] (eval datasets) or [B, N] (one sentence).

    predict(batch) gets the batch with input_ids / attention_mask [B, N] of one sentence (and
    'sentence': its number, 'is_weak' narrowed to it) and returns logits [B, 2, H, W].
    on_prediction(batch, logits) sees each prediction (visualisation). Returns the meter reduced over
    all ranks (a collective: every rank must call it).
    """
    meter = RefSegMeter()
    non_finite = torch.zeros((), dtype=torch.int64, device=device)  # sentences whose logits hold NaN/inf
    sentences = 0
    for batch in _progress(loader, desc):
        batch = to_device(batch, device)
        ids, mask = batch['input_ids'], batch['attention_mask']
        if ids.dim() == 2:
            ids, mask = ids[:, None], mask[:, None]  # [B, 1, N]
        weak = batch.get('is_weak')
        index = batch.get('index', batch.get('ref_id'))
        for j in range(ids.shape[1]):
            sub = dict(batch, input_ids=ids[:, j], attention_mask=mask[:, j], sentence=j)
            if isinstance(weak, torch.Tensor) and weak.dim() == 2:
                sub['is_weak'] = weak[:, j]
            logits = predict(sub).float()
            non_finite += (~torch.isfinite(logits).flatten(1).all(1)).sum()  # on the device: no sync here
            sentences += logits.shape[0]
            meter.update(logits, batch['target'], tensor_keys(index, j))
            if on_prediction is not None:
                on_prediction(sub, logits)
    counts = torch.tensor([int(non_finite), sentences], dtype=torch.int64, device=device)
    if distributed.is_dist():  # every rank raises or none does
        torch.distributed.all_reduce(counts)
    if counts[0] > 0:  # finite but huge weights overflow: scoring such outputs would report a silent 0
        raise InputError(f'the model\'s predictions are not finite (NaN or inf) for {int(counts[0])} of '
                         f'{int(counts[1])} sentences: its weights overflow or the run diverged; no metrics '
                         f'are reported')
    return meter.reduce()


def fit(*, train_step, predict, train_loader, val_loader, optimizer, lr_scheduler, start_epoch, epochs,
        device, save, best=None, print_freq=10, amp=False, writer=None, set_modes=None,
        on_epoch_start=None, before_step=None, after_backward=None, after_step=None, update=None,
        val_desc='Val'):
    """Epoch loop shared by the training scripts: train, evaluate, save.

    best: {metric: best value so far} of the validation metrics to track (default {'oIoU': -0.1}).
    save(epoch, summary, improved, best) runs on every rank after validation (`improved`: the tracked
    metrics that improved this epoch); set_modes(training) puts the modules in train mode before each
    epoch and in eval mode before validation; on_epoch_start(epoch) runs before each epoch's first step;
    before_step / after_backward / after_step / update go to `train_one_epoch`. Returns the updated `best`.
    """
    best = dict(best or {'oIoU': -0.1})
    steps_per_epoch = len(train_loader)
    for epoch in range(start_epoch, epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if hasattr(train_loader.dataset, 'set_epoch'):  # the items' draws (refer.dataset)
            train_loader.dataset.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        if set_modes is not None:
            set_modes(True)
        t0 = time.time()
        loss = train_one_epoch(train_step, train_loader, optimizer, lr_scheduler, epoch, device=device,
                               print_freq=print_freq, amp=amp, before_step=before_step,
                               after_backward=after_backward, after_step=after_step, writer=writer,
                               global_step=epoch * steps_per_epoch, update=update)
        if set_modes is not None:
            set_modes(False)
        summary = evaluate(predict, val_loader, device, desc=f'{val_desc} {epoch}').summary()
        improved = {k for k in best if summary[k] > best[k]}
        best.update({k: summary[k] for k in improved})
        logger.info(f'Epoch {epoch}: train loss {loss:.4f}, {time.time() - t0:.0f}s ({val_desc.lower()})\n'
                    f'{format_results(summary)}')
        if writer is not None:
            writer.add_scalar('val/oIoU', summary['oIoU'], epoch)
            writer.add_scalar('val/mIoU', summary['mIoU'], epoch)
            writer.add_scalar('train/epoch_loss', loss, epoch)
            writer.flush()
        save(epoch, summary, improved, best)
    return best
