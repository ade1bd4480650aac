"""Process set-up for one process or torchrun: device, process group, seeding, samplers, reductions.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process.
NCCL is used when the device is a GPU, gloo on CPU. Multi-node runs use torchrun's own flags.
"""
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from utils import InputError

logger = logging.getLogger('lrb')


@dataclass
class DistEnv:
    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def _resolve_device(device_arg, local_rank, distributed):
    """'cpu', 'cuda' or 'cuda:N'. Under torchrun a GPU process uses cuda:LOCAL_RANK."""
    name = (device_arg or 'cpu').strip()
    if name == 'cpu':
        return torch.device('cpu')
    if not name.startswith('cuda'):
        raise InputError(f"--device {device_arg!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device_arg}: no CUDA GPU is available here (use --device cpu)")
    if distributed:
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        return torch.device('cuda', local_rank)
    device = torch.device(name)
    if device.index is None:  # plain 'cuda': the current GPU, with its index (set_device needs one)
        device = torch.device('cuda', torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise InputError(f"--device {device_arg}: only {torch.cuda.device_count()} GPUs are visible")
    return device


def launch_world_size():
    """Number of processes torchrun started (1 without torchrun); readable before any set-up."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return max(1, int(os.environ['WORLD_SIZE']))
    return 1


def init_distributed(device_arg):
    """Read torchrun's environment, pick the device and start the process group if needed."""
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1
    rank = int(os.environ.get('RANK', 0)) if distributed else 0
    world_size = int(os.environ.get('WORLD_SIZE', 1)) if distributed else 1
    local_rank = int(os.environ.get('LOCAL_RANK', 0)) if distributed else 0
    device = _resolve_device(device_arg, local_rank, distributed)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size,
                                **kwargs)
    return DistEnv(distributed, rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def per_process_batch_size(global_batch_size, world_size):
    """The global --batch-size is split evenly across processes (as the reference)."""
    if global_batch_size < 1:
        raise InputError(f"--batch-size {global_batch_size}: must be >= 1")
    if global_batch_size % world_size != 0:
        raise InputError(f"--batch-size {global_batch_size} is not divisible by the {world_size} processes")
    return global_batch_size // world_size


AUTO_MAX_WORKERS = 8  # ~90 images/s each at 480 px (docs/benchmarks.md): far more than a GPU's step takes


def per_process_workers(workers, world_size):
    """Loader workers of each process. --workers N: ceil(N / world_size), as the reference. 'auto': the CPUs
    this process may use (its affinity, shared with the other processes of its node) minus one for the
    process itself, at least 1 and at most AUTO_MAX_WORKERS."""
    if workers == 'auto':
        from refer.check import cpus_per_local_process
        return max(1, min(AUTO_MAX_WORKERS, cpus_per_local_process() - 1))
    return max(0, (workers + world_size - 1) // world_size)


def setup_logging(rank):
    """INFO lines from rank 0 only; other ranks log warnings and errors."""
    logging.basicConfig(format='%(asctime)s %(message)s', datefmt='%H:%M:%S', force=True,
                        level=logging.INFO if rank == 0 else logging.WARNING)


# --- seeding ------------------------------------------------------------------------------

def seed_everything(seed, rank=0):
    """Seed python, numpy and torch. Each rank gets its own offset so augmentations differ;
    model weights stay identical because DDP broadcasts rank 0's parameters."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    # DataLoader workers: torch seeds python/numpy/torch in each worker from a base seed drawn from
    # the global torch RNG, so worker randomness follows this seed (and the RNG state we checkpoint).


def get_rng_state():
    """All global RNG states as plain containers and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --- samplers and reductions ----------------------------------------------------------------

class ShardedEvalSampler(Sampler):
    """Every index exactly once across ranks (rank r takes r, r+K, ...): no padding duplicates,
    so reduced metrics are the same for 1 and K processes."""

    def __init__(self, dataset_len, rank=None, world_size=None):
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.indices = list(range(self.rank, dataset_len, self.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def all_gather_objects(obj):
    """Gather one picklable object per rank -> list ordered by rank."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out

