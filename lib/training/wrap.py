"""The module a training step runs: DDP (with SyncBatchNorm on GPUs) when torchrun started several
processes. Checkpoints and evaluation keep using the plain module. (`--compile` compiles the whole step:
lib/training/step.py.)
"""
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def find_unused_parameters(model, forward_fn):
    """Names of trainable parameters that get no gradient from one forward/backward.

    Runs in eval mode (BatchNorm statistics and RNG untouched) and clears the gradients afterwards;
    DDP needs `find_unused_parameters=True` only if this list is not empty.
    """
    modules = model if isinstance(model, (list, tuple)) else [model]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.enable_grad():
            out = forward_fn()
            out.float().sum().backward()
        unused = [n for m in modules for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for m, t in zip(modules, was_training):
            m.train(t)
            for p in m.parameters():
                p.grad = None
    return unused


def wrap_for_distributed(module, env, find_unused=False):
    """SyncBatchNorm (GPU only: it has no CPU kernel) + DDP when torchrun started several processes."""
    if module is None:
        return None
    if not env.distributed:
        return module
    if env.device.type == 'cuda':
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if not any(p.requires_grad for p in module.parameters()):
        return module  # nothing to synchronise
    device_ids = [env.device.index] if env.device.type == 'cuda' else None
    # gradients as views into the all-reduce buckets: one copy of them instead of two (peak memory)
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused,
                                   gradient_as_bucket_view=True)
