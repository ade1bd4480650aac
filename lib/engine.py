"""The one training / evaluation engine behind train.py, test.py and the LRB stage scripts.

Pieces (each usable alone):
- building:      `build_model` (RMSIN + the separate BERT of `--model lavt`), `segment` (one forward)
- optimization:  `build_param_groups` (the reference's 4 groups), `build_optimizer`, `build_poly_scheduler`
- loops:         `train_one_epoch(step_fn, ...)`, `evaluate(predict, ...)`, `fit(...)` (epochs + eval +
                 checkpoints); a stage script swaps in its own `step_fn` / `predict` / checkpoint content
- checkpoints:   `save_checkpoint` (atomic, rank 0), `load_checkpoint` (weights_only with an allow-list),
                 `load_weights` (`module.` prefixes, one-line error naming the first mismatching key),
                 `restore_training_state` (optimizer, schedule, epoch, RNG, best score); before the first
                 step: `run_file_names` (what utils.guard_run_dir protects), `check_checkpoint_space`;
                 `make_writer` (TensorBoard, its folder made at the first write)

Faithful details worth knowing:
- Only backbone, classifier and the first 10 BERT encoder layers are optimized (BERT embeddings and
  layers >= 10 never change). `freeze_unoptimized` turns their gradients off, which changes nothing
  numerically and spares the backward pass and the gradient all-reduce.
- The separate BERT of `--model lavt` stays in eval mode (no dropout) while training: the reference
  gets it from `from_pretrained` (eval mode) and only ever calls `model.train()`.
- Epochs are numbered from 0 and the checkpoint's `epoch` is the last finished one (reference layout).
"""
import argparse
import contextlib
import datetime
import logging
import os
import pickle
import shutil
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from bert.encoder import encode
from lib import distributed
from lib.metrics import RefSegMeter, tensor_keys
from lib.pretrained import strip_prefix
import utils
from utils import InputError, atomic_file, unwrap_module as unwrap

logger = logging.getLogger('lrb')

NO_DECAY_KEYWORDS = ('norm', 'absolute_pos_embed', 'relative_position_bias_table')
NUM_BERT_LAYERS_TRAINED = 10


# --- building --------------------------------------------------------------------------------

def checkpoint_window_size(checkpoint):
    """Swin window size of a checkpoint's visual weights, read from a relative-position table
    ((2w - 1)^2 rows), or None."""
    for key in ('model', 'student_model'):
        state = checkpoint.get(key) if isinstance(checkpoint, dict) else None
        for name, value in (state.items() if isinstance(state, dict) else ()):
            if name.endswith('relative_position_bias_table') and hasattr(value, 'shape'):
                return (round(value.shape[0] ** 0.5) + 1) // 2
    return None


def build_model(args, pretrained=None, checkpoint=None):
    """RMSIN for args.model; for 'lavt' also the separate BERT (pooler removed). -> (model, bert|None).

    checkpoint: the weights that will be loaded next; a window-12 checkpoint gets a window-12 Swin without
    --window12 (the original's stage scripts and test.py took the window from the weights file's name)."""
    from lib import segmentation
    from bert.encoder import load_bert

    if checkpoint is not None and checkpoint_window_size(checkpoint) == 12 and not args.window12:
        logger.info('Swin window size 12, as the checkpoint\'s weights')
        args = argparse.Namespace(**{**vars(args), 'window12': True})
    pretrained = args.pretrained_swin_weights if pretrained is None else pretrained
    if pretrained and not os.path.isfile(pretrained):
        raise InputError(f"--pretrained_swin_weights {pretrained}: file not found "
                         f"(pass --pretrained_swin_weights '' for random initialisation)")
    if args.model == 'lavt':
        bert = load_bert(args.ck_bert)
        bert.pooler = None
        model = segmentation.lavt(pretrained, args, text_dim=bert.config.hidden_size)
        return model, bert
    if args.model == 'lavt_one':
        return segmentation.lavt_one(pretrained, args), None
    raise InputError(f"--model {args.model}: expected lavt or lavt_one")


def text_features(bert, input_ids, attention_mask=None, inputs_embeds=None):
    """Separate BERT -> l_feats [B, C, N] and l_mask [B, N, 1] as RMSIN takes them."""
    hidden = encode(bert, attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds)  # [B, N, C]
    return hidden.permute(0, 2, 1), attention_mask.unsqueeze(-1)


def segment(model, bert, image, input_ids, attention_mask):
    """One forward pass -> logits [B, 2, H, W] for both model kinds."""
    if bert is None:  # lavt_one: BERT inside the model
        return model(image, input_ids, attention_mask)
    l_feats, l_mask = text_features(bert, input_ids, attention_mask)
    return model(image, l_feats, l_mask)


def text_encoder_of(model, bert=None):
    return unwrap(bert) if bert is not None else unwrap(model).text_encoder


def validate_training_args(args):
    """Flag checks of every training script, before any process group -> per-process batch size."""
    utils.check_flag_values(args)  # --lr nan, --epochs 0, --img_size 100, --caption_inner_steps 0, ...
    if args.resume:
        utils.check_input_file(args.resume, '--resume')  # missing, or a directory
    if not os.path.isdir(args.refer_data_root):
        raise InputError(f'--refer_data_root {args.refer_data_root}: no such directory')
    check_compile_backend(args)
    return distributed.per_process_batch_size(args.batch_size, distributed.launch_world_size())


def check_compile_backend(args):
    backend = getattr(args, 'compile', '')
    if backend:
        import torch._dynamo
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise InputError(f'--compile {backend}: unknown torch.compile backend (known: {", ".join(known)})')


def dummy_forward(model, bert, img_size, device):
    """A one-sample forward (for `find_unused_parameters`)."""
    image = torch.zeros(1, 3, img_size, img_size, device=device)
    ids = torch.ones(1, 20, dtype=torch.long, device=device)
    mask = torch.zeros(1, 20, dtype=torch.long, device=device)
    mask[:, :2] = 1
    return lambda: segment(model, bert, image, ids, mask)


def launch(run, argv=None, validate=validate_training_args):
    """Entry point of a training script: parse, validate flags, set up the process(es), run(args, env,
    per-process batch size), tear down."""
    from utils import get_parser
    args = get_parser().parse_args(argv)
    batch_size = validate(args)
    env = distributed.init_distributed(args.device)
    try:
        return run(args, env, batch_size)
    finally:
        distributed.cleanup_distributed()


def start_run(args, env, batch_size):
    """Logging, seeding and the opening log line of a training run."""
    distributed.setup_logging(env.rank)
    if args.amp and env.device.type != 'cuda':
        logger.info('--amp is for GPUs; running in float32 on CPU')
    distributed.seed_everything(args.seed, env.rank)
    logger.info(f'{env.world_size} process(es) on {env.device}; batch {batch_size} per process; '
                f'image size {args.img_size}')


def end_epoch(args, start_epoch):
    """The epoch this run stops before (--epochs, or earlier with --stop_after); None when a resumed
    checkpoint has already finished every epoch."""
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the checkpoint already finished epoch {start_epoch - 1} of {args.epochs}')
        return None
    return args.epochs if not args.stop_after else min(args.epochs, start_epoch + args.stop_after)


# --- optimization ----------------------------------------------------------------------------

def build_param_groups(model, bert=None, num_bert_layers=NUM_BERT_LAYERS_TRAINED):
    """The reference's groups: backbone no-decay / backbone decay / classifier / first BERT layers.

    Names containing 'norm', 'absolute_pos_embed' or 'relative_position_bias_table' get weight decay 0;
    the other groups use the optimizer's default decay. With fewer than 10 BERT layers all are taken.
    """
    model = unwrap(model)
    no_decay, decay = [], []
    for name, p in model.backbone.named_parameters():
        (no_decay if any(k in name for k in NO_DECAY_KEYWORDS) else decay).append(p)
    layers = text_encoder_of(model, bert).encoder.layer
    n = min(num_bert_layers, len(layers))
    return [
        {'params': no_decay, 'weight_decay': 0.0},
        {'params': decay},
        {'params': [p for p in model.classifier.parameters() if p.requires_grad]},
        {'params': [p for i in range(n) for p in layers[i].parameters() if p.requires_grad]},
    ]


def unoptimized_parameters(modules, param_groups):
    """Names of trainable parameters of `modules` ({prefix: module}) that no group optimizes."""
    chosen = {id(p) for g in param_groups for p in g['params']}
    out = []
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, p in unwrap(module).named_parameters():
            if p.requires_grad and id(p) not in chosen:
                out.append(f'{prefix}.{name}' if prefix else name)
    return out


def freeze_unoptimized(modules, param_groups):
    """Turn off gradients of parameters the optimizer never updates (call before DDP wrapping)."""
    chosen = {id(p) for g in param_groups for p in g['params']}
    names = unoptimized_parameters(modules, param_groups)
    for module in modules.values():
        if module is None:
            continue
        for p in unwrap(module).parameters():
            if id(p) not in chosen:
                p.requires_grad_(False)
    return names


def build_optimizer(param_groups, args, lr=None):
    """AdamW of the reference (`lr` default: --lr); `--fused_adamw`: its fused kernel (one launch for all
    tensors; CUDA and CPU), the same update up to rounding. The implementation chosen here also holds
    after `load_state_dict`, which would otherwise take the one the checkpoint was saved with."""
    fused = bool(getattr(args, 'fused_adamw', False))
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr if lr is None else lr, weight_decay=args.weight_decay, amsgrad=args.amsgrad,
                                  **({'fused': True} if fused else {}))
    optimizer.register_load_state_dict_post_hook(_keep_implementation(fused))
    return optimizer


def _keep_implementation(fused):
    def hook(optimizer):
        for group in optimizer.param_groups:
            group['fused'] = True if fused else None
            for p in group['params']:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get('step')):
                    # fused keeps the step count on the parameter's device; the others on the host,
                    # where reading it for the bias correction needs no device sync
                    device, dtype = (p.device, torch.float32) if fused else ('cpu', torch.get_default_dtype())
                    state['step'] = state['step'].to(device=device, dtype=dtype)
    return hook


def apply_speed_options(module, args):
    """The module to train with under `--compile BACKEND`: torch.compile of it (static shapes), else
    the module itself. Call it after `wrap_for_distributed`, so that DDP's gradient buckets split the
    compiled graph; the module is not changed, so checkpoints (state_dict keys) and the evaluation,
    which keep using it, run as before. Build-time options are in `build_model` (--checkpoint_activations,
    --channels_last) and `build_optimizer` (--fused_adamw)."""
    backend = getattr(args, 'compile', '')
    if not backend or module is None:
        return module
    return torch.compile(module, backend=backend, dynamic=False)


def poly_factor(iteration, total_iters, power=0.9):
    """(1 - it / total) ** 0.9, clamped at 0 past the end."""
    return max(0.0, 1.0 - iteration / max(1, total_iters)) ** power


def build_poly_scheduler(optimizer, total_iters, power=0.9):
    """LambdaLR stepped once per iteration; total = iterations per epoch x epochs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_factor(it, total_iters, power))


# --- data -----------------------------------------------------------------------------------

def build_train_loader(dataset, batch_size, workers, seed, pin_memory=False, split='train'):
    """Shuffled DistributedSampler (seeded, `set_epoch` per epoch) + drop_last, as the reference."""
    from torch.utils.data import DataLoader, DistributedSampler
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
    from torch.utils.data import DataLoader
    if len(dataset) == 0:
        raise InputError(f"split '{split}' is empty: no refs to evaluate")
    sampler = distributed.ShardedEvalSampler(len(dataset))
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers, pin_memory=pin_memory)


def build_data(args, env, batch_size, val_split='val'):
    """Train set (train mode) and `val_split` set (eval mode: every sentence, no occlusion boxes) on one
    REFER index, with their loaders -> (train_set, val_set, train_loader, val_loader)."""
    from bert.encoder import load_tokenizer
    from refer.dataset import build_dataset
    tokenizer = load_tokenizer(args.bert_tokenizer)
    train_set = build_dataset(args, 'train', tokenizer, eval_mode=False)
    val_set = build_dataset(args, val_split, tokenizer, eval_mode=True, refer=train_set.refer)
    workers = distributed.per_process_workers(args.workers, env.world_size)
    train_loader = build_train_loader(train_set, batch_size, workers, args.seed, args.pin_mem, 'train')
    val_loader = build_eval_loader(val_set, workers, args.pin_mem, val_split)
    return train_set, val_set, train_loader, val_loader


# --- distributed wrapping --------------------------------------------------------------------

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


# --- loops -----------------------------------------------------------------------------------

HOST_KEYS = ('ref_id', 'index')  # ids stay on the host: lookups on them need no device sync


def to_device(batch, device):
    non_blocking = device.type == 'cuda'
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) and k not in HOST_KEYS
                else v) for k, v in batch.items()}


def autocast(device, enabled):
    """bf16 autocast on GPU; a no-op elsewhere."""
    if enabled and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def supervised_step(model, bert, criterion):
    """The stage-1 step: batch -> loss."""
    def step(batch):
        logits = segment(model, bert, batch['image'], batch['input_ids'], batch['attention_mask'])
        return criterion(logits, batch['target'])
    return step


def _progress(iterable, desc, total=None):
    from tqdm import tqdm
    # bars only on rank 0 and only on a terminal (disable=None), so logs stay readable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False,
                disable=None if distributed.is_main_process() else True)


def train_one_epoch(step_fn, loader, optimizer, lr_scheduler, epoch, *, device, print_freq=10,
                    amp=False, before_step=None, after_backward=None, after_step=None, writer=None,
                    global_step=0):
    """One pass over `loader`: step_fn(batch) -> loss; backward; optimizer and per-iteration schedule.

    Hooks (the LRB stages plug in here; stage 1 uses none):
      before_step(i, batch)   before the forward, e.g. the reference bank's inner loop in stage 3
      after_backward(i, batch) between backward and optimizer step, e.g. syncing the bank's gradient
      after_step(i, batch)    after the optimizer step, e.g. the EMA teacher update
    Modes (train/eval) of the modules are the caller's business. Returns the mean loss.
    No host synchronisation per iteration: the loss is read back only every `print_freq` steps.
    """
    num_iters = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_sum = torch.zeros((), dtype=torch.float64, device=device)
    window_n = 0
    start = time.time()
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(_progress(loader, f'Epoch {epoch}', num_iters)):
        batch = to_device(batch, device)
        if before_step is not None:
            before_step(i, batch)
        with autocast(device, amp):
            loss = step_fn(batch)
        loss.backward()
        if after_backward is not None:
            after_backward(i, batch)
        optimizer.step()
        # freed here rather than before backward: the next forward then runs without them (peak memory)
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        if after_step is not None:
            after_step(i, batch)
        loss_sum += loss.detach()
        window_sum += loss.detach()
        window_n += 1
        if (i + 1) % max(1, print_freq) == 0 or i + 1 == num_iters:
            lr = optimizer.param_groups[0]['lr']
            avg = window_sum.item() / window_n
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
            meter.update(logits, batch['target'], tensor_keys(index, j))
            if on_prediction is not None:
                on_prediction(sub, logits)
    return meter.reduce()


# --- checkpoints -----------------------------------------------------------------------------

# keys that differ between library versions without meaning a different architecture
_BENIGN_KEY_SUFFIXES = ('num_batches_tracked', 'position_ids', 'token_type_ids', 'relative_position_index',
                        'attn_mask')


def save_checkpoint(state, path, resumable=True):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed (rank 0 only).
    A failed write (disk full, read-only) is one OutputError naming `path` and the cause, and the
    previous file at `path` stays intact. `resumable`: the Ctrl-C message of utils.run_cli names it
    as the file to --resume from (pass False for files that are not training checkpoints)."""
    if distributed.is_main_process():
        with atomic_file(path) as tmp:
            with open(tmp, 'wb') as f:  # through a Python file, a full disk is an OSError with its cause
                try:
                    torch.save(state, f)
                except RuntimeError as e:  # torch's zip writer wraps the OSError while closing the archive
                    cause = e.__context__
                    while cause is not None and not isinstance(cause, OSError):
                        cause = cause.__context__
                    if cause is None:
                        raise
                    raise cause from None  # atomic_file: one line naming `path` and the cause
    if resumable:
        utils.record_checkpoint(path, state.get('epoch') if isinstance(state, dict) else None)


def copy_atomic(src, dst):
    """Copy a written checkpoint (model_best, model_epoch_N), atomically; errors as save_checkpoint."""
    if distributed.is_main_process():
        with atomic_file(dst) as tmp:
            shutil.copyfile(src, tmp)


_TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'  # pickled magic number of torch < 1.6 files


def _looks_like_torch_file(path):
    """The zip archive torch.save writes (perhaps truncated) or a legacy torch file."""
    with open(path, 'rb') as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    return head.startswith(b'PK\x03\x04') or head == _TORCH_LEGACY_MAGIC


def _first_line(exc):
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # torch's weights-only errors put the cause on a later line
        if ln.startswith('WeightsUnpickler error:'):
            return ln[len('WeightsUnpickler error:'):].strip()
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path, trust=False, flag='--resume'):
    """Load a checkpoint on CPU. Tensors and plain containers only (weights_only), with
    argparse.Namespace allowed because the reference stores its args that way; `trust=True` allows
    arbitrary pickles (only for files you made). One-line errors: missing, a directory, not a torch
    file, truncated, or naming the global the restricted loader refused."""
    import re
    utils.check_input_file(path, flag)
    try:
        if not _looks_like_torch_file(path):
            raise InputError(f'{flag} {path}: not a torch checkpoint (neither the zip archive of torch.save '
                             f'nor a legacy torch file)')
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r'GLOBAL ([\w.]+)', str(e))
        if not trust and refused:
            raise InputError(f"{flag} {path}: refused to unpickle the global '{refused.group(1)}' (by default "
                             f"only tensors and plain containers load); add --trust_checkpoint if you trust this "
                             f"file") from None
        if not trust and 'Weights only load failed' in str(e):
            raise InputError(f'{flag} {path}: refused to unpickle ({_first_line(e)}); '
                             f'add --trust_checkpoint if you trust this file') from None
        raise InputError(f'{flag} {path}: not a torch checkpoint ({_first_line(e)})') from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise InputError(f'{flag} {path}: not a readable torch checkpoint, perhaps truncated or damaged '
                         f'({type(e).__name__}: {_first_line(e)})') from None


def check_state_dict(module, state_dict):
    """First key mismatch between module and state_dict as a message, or None."""
    own = module.state_dict()
    for k, v in state_dict.items():
        if k not in own:
            if not k.endswith(_BENIGN_KEY_SUFFIXES):
                return f"unexpected key '{k}' {tuple(v.shape) if hasattr(v, 'shape') else ''}".rstrip()
        elif hasattr(v, 'shape') and tuple(v.shape) != tuple(own[k].shape):
            return f"key '{k}' has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
    for k in own:
        if k not in state_dict and not k.endswith(_BENIGN_KEY_SUFFIXES):
            return f"missing key '{k}'"
    return None


def load_weights(module, state_dict, source='checkpoint', what='model'):
    """Load a state dict (with or without `module.` prefixes) into `module`, or raise an InputError
    naming the first mismatching key: a checkpoint of another architecture fails loudly instead of
    loading half its weights (the reference used strict=False)."""
    module = unwrap(module)
    state_dict = strip_prefix(dict(state_dict))
    problem = check_state_dict(module, state_dict)
    if problem:
        raise InputError(f"{source}: '{what}' does not fit this architecture: {problem} "
                         f"(check --model, --swin_type, --img_size, --window12, --mha, --cross_scale, --ck_bert)")
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


def pick_model_state(checkpoint, key='auto', source='checkpoint'):
    """The visual model's weights: 'model' (train.py), else 'student_model' (stage 3)."""
    if not isinstance(checkpoint, dict):
        raise InputError(f'{source}: not a checkpoint dictionary')
    if key != 'auto':
        if key not in checkpoint:
            raise InputError(f"{source}: no '{key}' entry (has: {', '.join(sorted(checkpoint))})")
        return key, checkpoint[key]
    for k in ('model', 'student_model'):
        if k in checkpoint:
            return k, checkpoint[k]
    raise InputError(f"{source}: no 'model' or 'student_model' entry (has: {', '.join(sorted(checkpoint))})")


def load_model_and_bert(checkpoint, model, bert, key='auto', source='checkpoint'):
    """Weights of a train.py / stage-3 / original checkpoint into model (and the separate BERT)."""
    key, state = pick_model_state(checkpoint, key, source)
    load_weights(model, state, source, key)
    if bert is not None:
        if 'bert_model' not in checkpoint:
            raise InputError(f"{source}: no 'bert_model' entry, so it was not trained with --model lavt "
                             f"(try --model lavt_one)")
        load_weights(bert, checkpoint['bert_model'], source, 'bert_model')
    epoch = checkpoint.get('epoch')
    logger.info(f"weights: '{key}'" + (" and 'bert_model'" if bert is not None else '') + f' loaded from {source}'
                + (f' (epoch {epoch})' if isinstance(epoch, int) else ''))
    return key


def args_to_dict(args):
    return {k: v for k, v in vars(args).items()} if isinstance(args, argparse.Namespace) else dict(args)


def training_checkpoint(model, bert, optimizer, lr_scheduler, epoch, args, best_oiou=None, model_key='model',
                        **extra):
    """Reference keys (model, bert_model, optimizer, lr_scheduler, epoch, args) + resume extras."""
    state = {model_key: unwrap(model).state_dict()}
    if bert is not None:
        state['bert_model'] = unwrap(bert).state_dict()
    # every rank's RNG (a collective: call on all ranks), so a resumed run continues exactly
    state.update(optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(), epoch=epoch,
                 args=args_to_dict(args), best_oiou=best_oiou,
                 rng=distributed.all_gather_objects(distributed.get_rng_state()))
    state.update(extra)
    return state


def restore_training_state(checkpoint, optimizer, lr_scheduler, source='--resume'):
    """Optimizer, schedule and RNG from a checkpoint -> (first epoch to run, best oIoU so far)."""
    for key in ('optimizer', 'lr_scheduler', 'epoch'):
        if key not in checkpoint:
            raise InputError(f"{source}: no '{key}' entry, so training cannot continue from it")
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as e:
        raise InputError(f'{source}: optimizer state does not fit ({e})') from None
    lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    rng = checkpoint.get('rng')
    if isinstance(rng, list) and len(rng) == distributed.get_world_size():
        distributed.set_rng_state(rng[distributed.get_rank()])
    elif rng:
        logger.warning(f'{source}: saved by {len(rng)} processes, resumed by {distributed.get_world_size()}: '
                       f'random streams restart (weights, optimizer and schedule continue)')
    best = checkpoint.get('best_oiou')
    return int(checkpoint['epoch']) + 1, (-0.1 if best is None else float(best))


def checkpoint_paths(output_dir, model_id, epoch):
    """model_last always; model_epoch_<N> at epochs 10, 15, 20, ... (the reference's schedule)."""
    paths = {'last': os.path.join(output_dir, f'model_last_{model_id}.pth'),
             'best': os.path.join(output_dir, f'model_best_{model_id}.pth')}
    if epoch >= 10 and (epoch - 10) % 5 == 0:
        paths['epoch'] = os.path.join(output_dir, f'model_epoch_{epoch}.pth')
    return paths


def save_epoch_checkpoints(state, output_dir, model_id, epoch, is_best):
    """Write model_last (+ model_best when improved, + model_epoch_<N>): one torch.save, then copies."""
    paths = checkpoint_paths(output_dir, model_id, epoch)
    save_checkpoint(state, paths['last'])
    if is_best:
        copy_atomic(paths['last'], paths['best'])
    if 'epoch' in paths:
        copy_atomic(paths['last'], paths['epoch'])
    return paths


class LazySummaryWriter:
    """A TensorBoard SummaryWriter that creates its folder at the first write, so a run that fails
    before its first step leaves no empty log folder. `fresh`: drop the event files an earlier run
    left there first (train.py --overwrite)."""

    def __init__(self, log_dir, fresh=False):
        self.log_dir, self.fresh, self._writer = log_dir, fresh, None

    def _get(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            try:
                if self.fresh and os.path.isdir(self.log_dir):
                    for name in os.listdir(self.log_dir):
                        if name.startswith('events.out.tfevents.'):
                            os.unlink(os.path.join(self.log_dir, name))
                self._writer = SummaryWriter(log_dir=self.log_dir)
            except OSError as e:
                raise utils.write_error(self.log_dir, e) from None
        return self._writer

    def __getattr__(self, name):  # add_scalar, flush, ...: only what is not defined here
        attr = getattr(self._get(), name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):  # a full disk: one line naming the log folder
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise utils.write_error(self.log_dir, e) from None
        return call

    def close(self):
        if self._writer is not None:
            self._writer.close()


def make_writer(output_dir, model_id, fresh=False):
    """TensorBoard writer on rank 0 (None elsewhere), created lazily (see LazySummaryWriter)."""
    if not distributed.is_main_process():
        return None
    return LazySummaryWriter(os.path.join(output_dir, f'tb_{model_id}'), fresh=fresh)


def run_file_names(model_id, epochs, start_epoch=0):
    """Names of the checkpoints train.py writes in --output-dir over epochs [start_epoch, epochs):
    what utils.guard_run_dir must not let a new run replace silently."""
    names = [f'model_last_{model_id}.pth', f'model_best_{model_id}.pth']
    for epoch in range(start_epoch, epochs):
        path = checkpoint_paths('', model_id, epoch).get('epoch')
        if path:
            names.append(os.path.basename(path))
    return names


def estimate_checkpoint_bytes(modules, optimizer=None):
    """Bytes a training checkpoint of `modules` takes: their state dicts plus AdamW's two (amsgrad:
    three) moment tensors per optimized parameter (of one optimizer or a list), plus 1 MB for the rest."""
    total = 1 << 20
    for module in modules:
        if module is not None:
            total += sum(t.numel() * t.element_size() for t in unwrap(module).state_dict().values()
                         if torch.is_tensor(t))
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    for group in (g for opt in optimizers if opt is not None for g in opt.param_groups):
        moments = 3 if group.get('amsgrad') else 2
        total += moments * sum(p.numel() * p.element_size() for p in group['params'])
    return total


def check_checkpoint_space(output_dir, modules, optimizer=None, *, replaces=(), copies=3, flag='--output-dir'):
    """One-line OutputError before the first step when `output_dir` has no room for `copies` checkpoints
    (model_last, model_best and the temporary written before each rename) of this model; the files named
    in `replaces` that are already there count as room. Call it once the optimizer exists (train.py,
    stage scripts). -> the estimated size of one checkpoint."""
    size = estimate_checkpoint_bytes(modules, optimizer)
    if distributed.is_main_process():
        replaced = sum(os.path.getsize(p) for p in (os.path.join(output_dir, n) for n in replaces)
                       if os.path.isfile(p))
        needed = max(size, copies * size - replaced)
        utils.check_free_space(output_dir, needed, flag,
                               f'{copies} checkpoints of about {utils.format_bytes(size)} (last, best and the '
                               f'temporary copy written before each rename)')
    return size


def stage1_saver(make_state, output_dir, model_id):
    """train.py's files: model_last every epoch, model_best when val oIoU improves, model_epoch_<N>."""
    def save(epoch, summary, improved, best):
        paths = save_epoch_checkpoints(make_state(epoch, best['oIoU']), output_dir, model_id, epoch,
                                       'oIoU' in improved)
        logger.info(f"saved {paths['last']}" + (' (best so far)' if 'oIoU' in improved else ''))
    return save


def fit(*, train_step, predict, train_loader, val_loader, optimizer, lr_scheduler, start_epoch, epochs,
        device, save, best=None, print_freq=10, amp=False, writer=None, set_modes=None,
        on_epoch_start=None, before_step=None, after_backward=None, after_step=None, val_desc='Val'):
    """Epoch loop shared by the training scripts: train, evaluate, save.

    best: {metric: best value so far} of the validation metrics to track (default {'oIoU': -0.1}).
    save(epoch, summary, improved, best) runs on every rank after validation (`improved`: the tracked
    metrics that improved this epoch); set_modes(training) puts the modules in train mode before each
    epoch and in eval mode before validation; on_epoch_start(epoch) runs before each epoch's first step;
    before_step / after_backward / after_step go to `train_one_epoch`. Returns the updated `best`.
    """
    from lib.metrics import format_results
    best = dict(best or {'oIoU': -0.1})
    steps_per_epoch = len(train_loader)
    for epoch in range(start_epoch, epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        if set_modes is not None:
            set_modes(True)
        t0 = time.time()
        loss = train_one_epoch(train_step, train_loader, optimizer, lr_scheduler, epoch, device=device,
                               print_freq=print_freq, amp=amp, before_step=before_step,
                               after_backward=after_backward, after_step=after_step, writer=writer,
                               global_step=epoch * steps_per_epoch)
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


# --- visualisation ---------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OverlayWriter:
    """`on_prediction` hook of `evaluate`: PNG panels (image | ground truth | prediction + expression)
    for the first `num` dataset items. Each rank writes the items it evaluated."""

    def __init__(self, out_dir, num, tokenizer=None):
        self.out_dir, self.num, self.tokenizer = out_dir, num, tokenizer
        os.makedirs(out_dir, exist_ok=True)
        self.written = []

    def expression(self, ids, mask):
        ids = ids[mask.bool()].tolist()
        if self.tokenizer is None:
            return ' '.join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, batch, logits):
        index = batch.get('index', batch.get('ref_id'))
        index = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        pred = logits.argmax(1).cpu()
        for b, idx in enumerate(index):
            if idx >= self.num:
                continue
            text = self.expression(batch['input_ids'][b].cpu(), batch['attention_mask'][b].cpu())
            path = os.path.join(self.out_dir, f'{idx:05d}_s{batch.get("sentence", 0)}.png')
            save_overlay(path, batch['image'][b].cpu(), batch['target'][b].cpu(), pred[b], text)
            self.written.append(path)


def save_overlay(path, image, target, pred, text, min_side=256):
    """image [3, H, W] normalized; target/pred [H, W] in {0, 1}; writes the panel atomically."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # [H, W, 3]

    def tint(mask, color):
        out = rgb.astype(np.float32)
        m = mask.numpy().astype(bool)
        out[m] = 0.5 * out[m] + 0.5 * np.array(color, dtype=np.float32)
        return out.astype(np.uint8)

    h, w = rgb.shape[:2]
    scale = max(1, -(-min_side // max(h, w)))  # small inputs are enlarged (nearest) to stay readable
    h, w = h * scale, w * scale
    lines = textwrap.wrap(f'"{text}"', width=max(20, 3 * w // 7)) or ['""']
    band = 16 * (len(lines) + 1) + 4
    panel = Image.new('RGB', (3 * w, h + band), (255, 255, 255))
    for k, arr in enumerate((rgb, tint(target, (0, 255, 0)), tint(pred, (255, 0, 0)))):
        panel.paste(Image.fromarray(arr).resize((w, h), Image.NEAREST), (k * w, 0))
    draw = ImageDraw.Draw(panel)
    for k, caption in enumerate(('image', 'ground truth', 'prediction')):
        draw.text((k * w + 4, 4), caption, fill=(255, 255, 0))
    for k, line in enumerate(lines):
        draw.text((4, h + 4 + 16 * k), line, fill=(0, 0, 0))
    with atomic_file(path) as tmp:
        panel.save(tmp, format='PNG')
