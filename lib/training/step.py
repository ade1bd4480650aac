"""A training iteration as the engine runs it: the stage's loss as one function of device tensors, and the
update around it (forward, backward, optimizer step).

- A *step* (`SupervisedStep` here; `Stage2Bank`, `Stage3Joint` in lib/training/lrb/stages.py) has
  `inputs(batch)` -> a tuple of device tensors of fixed shapes and `loss(*inputs)` -> the scalar loss;
  `step(batch)` is `loss(*inputs(batch))`. Host-side work (the bank's ref-id lookup) happens in
  `inputs`, so `loss` has no host synchronisation, no data-dependent shape and no branch on values.
- `compile_step(step, args, distributed)`: `--compile` compiles `step.loss` as one graph
  (`fullgraph=True`: the text encoder, the bank fill, RMSIN and the loss together; a graph break is an
  error, not a silent slowdown). Under DDP the graph breaks where DDP's forward runs its own Python
  (its reducer's bookkeeping), so there it compiles without `fullgraph`.
- `EagerUpdate`: forward under autocast, backward, the stage's after-backward hook, optimizer step, zero
  grad. `lib.training.cuda_graphs.GraphedUpdate` does the same as one replayed CUDA graph.
"""
import contextlib

import torch

from lib.model.build import segment


def autocast(device, enabled, cache=True):
    """bf16 autocast on GPU; a no-op elsewhere. cache=False inside a CUDA graph capture (the cast weights
    must not outlive it)."""
    if enabled and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


class SupervisedStep:
    """Stage 1 (and Naive-WREL): BERT + RMSIN + the segmentation loss on the whole batch."""

    def __init__(self, model, bert, criterion):
        self.model, self.bert, self.criterion = model, bert, criterion

    @staticmethod
    def inputs(batch):
        return batch['image'], batch['input_ids'], batch['attention_mask'], batch['target']

    def loss(self, image, input_ids, attention_mask, target):
        return self.criterion(segment(self.model, self.bert, image, input_ids, attention_mask), target)

    def __call__(self, batch):
        return self.loss(*self.inputs(batch))


def compile_step(step, args, distributed=False):
    """`step` with its loss functions (`step.LOSSES`, default ('loss',)) compiled under `--compile BACKEND`
    (static shapes; each one graph in one process); the step itself otherwise. The modules are not
    changed: checkpoints and evaluation use them as before."""
    backend = getattr(args, 'compile', '')
    if backend:
        for name in getattr(step, 'LOSSES', ('loss',)):
            setattr(step, name, torch.compile(getattr(step, name), backend=backend, fullgraph=not distributed,
                                              dynamic=False))
    return step


class EagerUpdate:
    """update(i, batch) -> the loss (a device tensor): forward, backward, after_backward(i, batch),
    optimizer step, gradients freed."""

    def __init__(self, step, optimizer, *, device, amp=False, after_backward=None):
        self.step, self.optimizer, self.device, self.amp = step, optimizer, device, amp
        self.after_backward = after_backward

    def __call__(self, i, batch):
        with autocast(self.device, self.amp):
            loss = self.step(batch)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(i, batch)
        self.optimizer.step()
        # freed here rather than before backward: the next forward then runs without them (peak memory)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
