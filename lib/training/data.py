"""Data loaders of the reference: a shuffled, seeded DistributedSampler with drop_last for training,
and one ref per batch (all its sentences) for evaluation, each process its own share."""
from torch.utils.data import DataLoader, DistributedSampler

from bert.encoder import load_tokenizer
from refer.dataset import build_dataset
from utils import InputError

from . import distributed


def build_train_loader(dataset, batch_size, workers, seed, pin_memory=False, split='train'):
    """Shuffled DistributedSampler (seeded, `set_epoch` per epoch) + drop_last, as the reference."""
    if len(dataset) == 0:
        raise InputError(f"split '{split}' is empty: no refs to train on")
    sampler = DistributedSampler(dataset, num_replicas=distributed.get_world_size(),
                                 rank=distributed.get_rank(), shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=False)
    if len(loader) == 0:
        raise InputError(f"split '{split}' has {len(dataset)} refs, fewer than one batch of {batch_size} "
                         f"per process (lower --batch-size)")
    return loader


def build_eval_loader(dataset, workers, pin_memory=False, split='val'):
    """Batch size 1 (items hold all K sentences of a ref); each rank gets its own share, no repeats."""
    if len(dataset) == 0:
        raise InputError(f"split '{split}' is empty: no refs to evaluate")
    sampler = distributed.ShardedEvalSampler(len(dataset))
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers, pin_memory=pin_memory)


def build_data(args, env, batch_size, val_split='val'):
    """Train set (train mode) and `val_split` set (eval mode: every sentence, no occlusion boxes) on one
    REFER index, with their loaders -> (train_set, val_set, train_loader, val_loader)."""
    tokenizer = load_tokenizer(args.bert_tokenizer)
    # train items leave the workers as uint8 (a fifth of the bytes); engine.to_device finishes them on the device
    train_set = build_dataset(args, 'train', tokenizer, eval_mode=False, uint8_items=True)
    val_set = build_dataset(args, val_split, tokenizer, eval_mode=True, refer=train_set.refer)
    workers = distributed.per_process_workers(args.workers, env.world_size)
    train_loader = build_train_loader(train_set, batch_size, workers, args.seed, args.pin_mem, 'train')
    val_loader = build_eval_loader(val_set, workers, args.pin_mem, val_split)
    return train_set, val_set, train_loader, val_loader
