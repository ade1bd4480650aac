"""Activation checkpointing (`--checkpoint_activations`) that leaves the training maths unchanged.

`checkpointed(fn, *args, modules=...)` runs `fn(*args)` keeping only its inputs for the backward pass,
which runs it again (torch.utils.checkpoint, non-reentrant). The replay draws the same dropout masks
(the RNG state is replayed) and, unlike plain torch.utils.checkpoint, leaves BatchNorm running
statistics as the first run left them: a train-mode BatchNorm would otherwise update them twice per
step. Works under torch.compile as well.
"""
import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ['checkpointed']


@contextlib.contextmanager
def _batchnorm_statistics_kept(batchnorms):
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in batchnorms if m.training and m.track_running_stats and m.running_mean is not None]
    try:
        yield
    finally:  # also when the replay stops early, once every saved tensor is recomputed
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpointed(fn, *args, modules=()):
    """fn(*args), recomputed in the backward pass when gradients are on; `modules`: those `fn` runs,
    whose BatchNorm statistics the replay must not move."""
    if not torch.is_grad_enabled():
        return fn(*args)
    batchnorms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # under torch.compile the statistics' update is one write at the end of the compiled forward, which
    # its recomputation does not repeat (and dynamo takes no context_fn)
    if not batchnorms or torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _batchnorm_statistics_kept(batchnorms)))
