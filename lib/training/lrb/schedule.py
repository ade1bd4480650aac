"""When stage 3 steps the bank and how its teacher follows the student.

- `ema_momentum`, `ema_update_`: the stage-3 teacher follows the student's parameters.
- `bank_step_plan`, `count_bank_steps`: which iterations run the stage-3 inner loop, decided from the
  samplers' indices of every process, so the bank schedule is exact and every process steps together.
"""
import torch
from torch.utils.data import DistributedSampler

from utils import unwrap_module as unwrap


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
    s = list(unwrap(student).parameters())
    if len(t) != len(s):
        raise RuntimeError(f'EMA: teacher has {len(t)} parameters, student {len(s)}')
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def sampler_indices(num_samples, world_size, rank, seed, epoch):
    """The indices `lib.training.data.build_train_loader`'s DistributedSampler gives `rank` in `epoch`."""
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
