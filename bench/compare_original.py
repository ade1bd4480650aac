"""Training speed and memory of this codebase against the original LRB-WREL code, in one process.

    python bench/compare_original.py --original_dir .original                        # CPU: the small config
    python bench/compare_original.py --original_dir .original --device cuda          # paper + throughput
    python bench/compare_original.py --device cpu --variants fp32,fp32+compile       # ours only

--original_dir is your own clone of github.com/AHideoKuzeA/LRB-WREL; nothing of it is part of this
repository. What it imports and does not need here is faked at run time, only while it is imported:
`mmcv` (its checkpoint loader; the weights here are random), `wandb`, and `requests`, `einops`, `cv2`,
`h5py` when they are not installed. Its data/*.py parse the command line at import and are not imported.

Both models get the same weights (ours loads the original's state_dict with the strict loader) and the
same CPU-resident batch, which each loop moves to the device itself. Variants (`--variants`):
  original          the original's own `train_one_epoch` from its train.py: its model, `Loss`, AdamW groups,
                    LambdaLR, per-iteration `.item()`, `gc.collect`, `empty_cache`, `synchronize`, and
                    DDP with find_unused_parameters in a 1-process group, as `torchrun --nproc_per_node=1`
                    runs it (with its cudnn.deterministic / benchmark=False of seed_everything)
  original_no_ddp   the same loop without DDP
  fp32, bf16        ours: `engine.train_one_epoch` without / with --amp (TF32 is allowed on both, as the
                    original enables it)
  BASE+OPTION...    with speed options: compile, fused_adamw, channels_last, checkpoint (activations),
                    pin_mem (pinned host batch), cudnn_benchmark (no flag yet: cudnn.benchmark while it runs),
                    ddp (DDP in a 1-process group, as train.py under torchrun: the paper's 4-GPU setting),
                    cudagraphs (--cuda_graphs: the whole update captured as one CUDA graph and replayed;
                    with or without compile; not with ddp)
Timing: warm-up (compiles happen there), then --rounds rounds that each run every variant for --iters
iterations in turn, so drift on a shared machine hits all alike; the median round is reported. Compiled
variants are timed afterwards, alternating with their eager twin: the compiler leaves a large heap, which
the original's per-iteration gc.collect would have to scan.
Memory: the peak of bytes allocated to tensors while a variant is built and warms up, counted from just
before it was built (its weights, DDP buckets, gradients, optimizer state, activations, temporaries). On a
GPU from the caching allocator's statistics; on the CPU by following every tensor storage allocated
(`PeakTensorMemory`), with AdamW on the multi-tensor path a GPU takes by default, so that the figure stands
for the GPU's (H100, Swin-B 480 batch 2: the original 8.20 GiB allocated there, 8.04 GiB counted here).
Also on the CPU: the bytes autograd saves for the backward pass (`activations_gib`).
MFU: FLOPs of one training step of our model (torch.utils.flop_counter, forward + backward) x it/s,
divided by the device's dense bf16 peak (bf16 variants) or TF32 peak (the others), known for H100 and
H200, else given by --peak_tflops.

Configs: paper (Swin-B, 480 px, batch 2 per GPU), throughput (batch 8), small (Swin-T, 96 px, batch 2,
a 2-layer BERT of width 768, for CPUs). The original hard-codes Swin-B widths in its cross-scale module,
its 15 x 15 (480-px) token grid and a BERT width of 768; for the small config those two constants are
changed at run time (two constructor defaults and the one 15 x 15 reshape), nothing else.
"""
import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import types
import weakref
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import utils  # noqa: E402
from lib.files import atomic_file  # noqa: E402
from lib.model import segmentation  # noqa: E402
from lib.model.build import segment  # noqa: E402
from lib.training import engine  # noqa: E402
from lib.training.checkpoint import load_weights  # noqa: E402
from lib.training.losses import build_criterion  # noqa: E402
from lib.training.optim import build_optimizer, build_param_groups, build_poly_scheduler, freeze_unoptimized  # noqa: E402
from lib.training.cuda_graphs import build_update  # noqa: E402
from lib.training.step import compile_step  # noqa: E402
from lib.training.wrap import wrap_for_distributed  # noqa: E402

CONFIGS = {
    'paper': dict(swin_type='base', img_size=480, batch=2, bert_layers=12),
    'throughput': dict(swin_type='base', img_size=480, batch=8, bert_layers=12),
    'small': dict(swin_type='tiny', img_size=96, batch=2, bert_layers=2),
}
BERT_WIDTH = 768  # the original's PWAM takes 768-wide text features (a literal); cfg['bert_width'] for ours alone
WORDS = 20
COMPILE_RESERVE_S = 120  # seconds a compile may take (H100: about a minute, estimated)
OPTIONS = ('compile', 'cudagraphs', 'fused_adamw', 'channels_last', 'checkpoint', 'pin_mem', 'cudnn_benchmark',
           'ddp')
# dense peak TFLOPS per GPU (bf16, tf32), most specific name first
PEAK_TFLOPS = (('H100 PCIe', (756.0, 378.0)), ('H100 NVL', (835.0, 417.5)), ('H200 NVL', (835.0, 417.5)),
               ('H100', (989.4, 494.7)), ('H200', (989.4, 494.7)))
DEFAULT_VARIANTS = {
    'cuda': 'original,original_no_ddp,fp32,bf16,bf16+fused_adamw,fp32+channels_last,bf16+channels_last,'
            'bf16+cudnn_benchmark,bf16+channels_last+fused_adamw,bf16+pin_mem,fp32+checkpoint,bf16+checkpoint,'
            'bf16+compile,bf16+compile+channels_last+fused_adamw',
    # add fp32+compile for torch.compile on a CPU: its first compile takes many minutes there
    'cpu': 'original,original_no_ddp,fp32,fp32+fused_adamw,fp32+channels_last,fp32+checkpoint',
}


# ----------------------------------------------------------------------------------------------------------
# importing the original

ORIGINAL_TOP_LEVEL = ('lib', 'bert', 'utils', 'loss', 'arc', 'transforms', 'train', 'args', 'refer', 'data')


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _unavailable(*args, **kwargs):
    raise RuntimeError('stub: not available in compare_original')


def _rearrange(x, pattern):
    """einops.rearrange for pure permutations ('b c h w -> b h w c'), all the original uses."""
    left, right = (side.split() for side in pattern.split('->'))
    if sorted(left) != sorted(right):
        raise ValueError(f'stub einops: only permutations, got {pattern!r}')
    return x.permute(*[left.index(name) for name in right])


def original_stubs():
    """sys.modules entries for what the original imports but does not use here."""
    noop = lambda *a, **k: None  # noqa: E731
    stubs = {
        'mmcv': _module('mmcv', __path__=[], __version__='stub'),
        'mmcv.fileio': _module('mmcv.fileio', FileClient=object, load=_unavailable),
        'mmcv.parallel': _module('mmcv.parallel', is_module_wrapper=lambda m: hasattr(m, 'module')),
        'mmcv.utils': _module('mmcv.utils', mkdir_or_exist=noop, FileClient=object, load=_unavailable),
        'mmcv.runner': _module('mmcv.runner', get_dist_info=lambda: (0, 1)),
        'wandb': _module('wandb', init=noop, log=noop, watch=noop, save=noop),
    }
    optional = {
        'requests': lambda: _module('requests', get=_unavailable, head=_unavailable,
                                    exceptions=types.SimpleNamespace(Timeout=type('Timeout', (OSError,), {}))),
        'einops': lambda: _module('einops', rearrange=_rearrange),
        'cv2': lambda: _module('cv2', countNonZero=_unavailable),
        'h5py': lambda: _module('h5py', File=_unavailable),
    }
    for name, make in optional.items():
        if importlib.util.find_spec(name) is None:
            stubs[name] = make()
    return stubs


@contextlib.contextmanager
def _original_on_path(original_dir):
    """Import the original's top-level packages (lib, bert, utils, ...: the same names as ours) with
    ours set aside, then put ours back; the original's modules keep working through their globals."""
    own = {n: m for n, m in sys.modules.items() if n.split('.')[0] in ORIGINAL_TOP_LEVEL}
    for name in own:
        del sys.modules[name]
    stubs = original_stubs()
    shadowed = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    saved_path = list(sys.path)
    # our folder leaves the path meanwhile: its regular packages would win over the original's
    # namespace packages (bert/, lib/ have no __init__.py) wherever they stand on the path
    sys.path[:] = [str(original_dir)] + [p for p in sys.path if Path(p or '.').resolve() != REPO]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if n.split('.')[0] in ORIGINAL_TOP_LEVEL]:
            del sys.modules[name]
        for name, module in shadowed.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.update(own)


_ORIGINAL = {}


def import_original(original_dir):
    """-> namespace(train, segmentation, backbone, cross_scale, BertModel, BertConfig) of the original
    (imported once per folder)."""
    original_dir = Path(original_dir).resolve()
    if original_dir not in _ORIGINAL:
        _ORIGINAL[original_dir] = _import_original(original_dir)
    return _ORIGINAL[original_dir]


def _import_original(original_dir):
    needed = ['train.py', 'lib/segmentation.py', 'lib/cross_scale_interaction.py', 'bert/modeling_bert.py',
              'loss/loss.py']
    missing = [p for p in needed if not (original_dir / p).is_file()]
    if missing:
        raise utils.InputError(f'--original_dir {original_dir}: not a clone of AHideoKuzeA/LRB-WREL '
                               f'(no {", ".join(missing)})')
    import warnings
    with _original_on_path(original_dir), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm.models.layers deprecation and the like
        import importlib
        train = importlib.import_module('train')
        segmentation = importlib.import_module('lib.segmentation')
        backbone = importlib.import_module('lib.backbone')
        cross_scale = importlib.import_module('lib.cross_scale_interaction')
        modeling_bert = importlib.import_module('bert.modeling_bert')
    train.args = argparse.Namespace(local_rank=0)  # read by its train_one_epoch (wandb.log, a stub)
    return types.SimpleNamespace(train=train, segmentation=segmentation, backbone=backbone,
                                 cross_scale=cross_scale, BertModel=modeling_bert.BertModel,
                                 BertConfig=modeling_bert.BertConfig, dir=original_dir)


@contextlib.contextmanager
def _quiet():
    """stdout to /dev/null (the original prints per iteration, the model factories print their init)."""
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
        yield


class _GridView(torch.Tensor):
    """Output of the original's cross-scale token mixer at sizes other than 480 px: its `.view(B, C, 15,
    15)` gets the real grid instead of the literal 15 x 15."""
    grid = (15, 15)

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        if func is torch.Tensor.view and len(args) == 5 and tuple(args[3:]) == (15, 15):
            return args[0].as_subclass(torch.Tensor).view(args[1], args[2], *cls.grid)
        return super().__torch_function__(func, types_, args, kwargs or {})


@contextlib.contextmanager
def _original_size_shims(orig, img_size, swin_type):
    """Constructor defaults of the original's cross-scale module for a grid other than 15 x 15 and
    Swin widths other than Swin-B's (restored afterwards)."""
    from lib.model.backbone import SWIN_PRESETS
    from lib.model.cross_scale import token_counts
    grid = img_size // 32
    embed = SWIN_PRESETS[swin_type][0]
    csa_init, cim_init = orig.cross_scale.CrossScaleAttention.__init__, orig.cross_scale.CIM.__init__
    saved = csa_init.__defaults__, cim_init.__defaults__
    if grid == 15 and embed == 128:
        yield False
        return
    csa_init.__defaults__ = token_counts(grid, grid)  # (img_shape, att_shape)
    cim_init.__defaults__ = (saved[1][0], [embed * 2 ** i for i in range(4)], *saved[1][2:])
    try:
        yield True
    finally:
        csa_init.__defaults__, cim_init.__defaults__ = saved


def build_original(orig, cfg, seed=0):
    """The original's RMSIN and BERT (random weights, on the CPU) as its train.py builds them."""
    args = argparse.Namespace(swin_type=cfg['swin_type'], window12=True, mha='', fusion_drop=0.0, model='lavt')
    torch.manual_seed(seed)
    with _original_size_shims(orig, cfg['img_size'], cfg['swin_type']) as shimmed, \
            _quiet():
        model = orig.segmentation.lavt(pretrained='', args=args)
    if shimmed:
        _GridView.grid = (cfg['img_size'] // 32,) * 2
        for module in model.modules():
            if isinstance(module, orig.cross_scale.Attention):
                module.register_forward_hook(lambda m, i, out: out.as_subclass(_GridView))
    config = orig.BertConfig(vocab_size=30522, hidden_size=BERT_WIDTH, num_hidden_layers=cfg['bert_layers'],
                             num_attention_heads=BERT_WIDTH // 64, intermediate_size=4 * BERT_WIDTH)
    bert = orig.BertModel(config)
    bert.pooler = None
    bert.eval()  # from_pretrained returns it in eval mode and the original never calls bert.train()
    return model, bert


# ----------------------------------------------------------------------------------------------------------
# one process group for the original's DDP

@contextlib.contextmanager
def single_process_group(device):
    import torch.distributed as dist
    if dist.is_initialized():
        yield False
        return
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield True
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# variants

def parse_variant(name):
    parts = name.split('+')
    base, options = parts[0], set(parts[1:])
    if base not in ('original', 'original_no_ddp', 'fp32', 'bf16'):
        raise utils.InputError(f'--variants {name}: starts with original, original_no_ddp, fp32 or bf16')
    unknown = options - set(OPTIONS)
    if unknown or (base.startswith('original') and options):
        raise utils.InputError(f'--variants {name}: options are {", ".join(OPTIONS)}, for ours only')
    if {'cudagraphs', 'ddp'} <= options:
        raise utils.InputError(f'--variants {name}: cudagraphs runs in one process only (drop ddp)')
    return base, options


def synthetic_batch(cfg, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = cfg['batch'], cfg['img_size']
    mask = torch.zeros(b, WORDS, dtype=torch.long)
    mask[:, :8] = 1
    target = torch.zeros(b, s, s, dtype=torch.long)
    target[:, s // 4: s // 2, s // 3: 2 * s // 3] = 1
    return {'image': torch.randn(b, 3, s, s, generator=g), 'target': target,
            'input_ids': torch.randint(1, vocab, (b, WORDS), generator=g) * mask, 'attention_mask': mask}


class _Loader:
    """The same batch n times, with a cheap repr (the original's log_every prints its loader)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __repr__(self):
        return f'<{self.n} batches>'


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _as_original_runs(device):
    """The original's global settings while its loop runs; on a CPU its .cuda() calls are the identity."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # its seed_everything
    try:
        with _quiet(), contextlib.ExitStack() as stack:
            if device.type != 'cuda':
                stack.enter_context(mock.patch.object(torch.Tensor, 'cuda', lambda self, *a, **k: self))
                stack.enter_context(mock.patch('torch.cuda.synchronize', lambda *a, **k: None))
                stack.enter_context(mock.patch('torch.cuda.empty_cache', lambda *a, **k: None))
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class OriginalVariant:
    """The original's train_one_epoch on its own model, optimizer and schedule."""

    def __init__(self, orig, model, bert, batch, device, ddp):
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.orig, self.device = orig, device
        model, bert = model.to(device), bert.to(device)
        if ddp:  # as its main(): SyncBatchNorm (a no-op for one process; it has no CPU kernel) + DDP
            if device.type == 'cuda':
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [device.index] if device.type == 'cuda' else None
            self.model = DDP(model, device_ids=ids, find_unused_parameters=True)
            self.bert = DDP(bert, device_ids=ids)
        else:
            self.model, self.bert = model, bert
        single_model, single_bert = model, bert
        no_decay, decay = [], []
        for name, p in single_model.backbone.named_parameters():
            if 'norm' in name or 'absolute_pos_embed' in name or 'relative_position_bias_table' in name:
                no_decay.append(p)
            else:
                decay.append(p)
        layers = single_bert.encoder.layer
        groups = [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay},
                  {'params': [p for p in single_model.classifier.parameters() if p.requires_grad]},
                  {'params': [p for i in range(min(10, len(layers))) for p in layers[i].parameters()
                              if p.requires_grad]}]
        self.optimizer = torch.optim.AdamW(groups, lr=3e-5, weight_decay=1e-2, amsgrad=False)
        total = 10 ** 7
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda x: (1 - x / total) ** 0.9)
        # its dataset yields sentences / attentions as [1, 20] per item
        self.batch = (batch['image'], batch['target'], batch['input_ids'][:, None], batch['attention_mask'][:, None])
        self.epoch = 0

    def modules(self):
        return [self.model, self.bert]

    def run(self, n):
        with _as_original_runs(self.device):
            self.orig.train.train_one_epoch(self.model, self.orig.train.criterion, self.optimizer,
                                            _Loader(self.batch, n), self.scheduler, self.epoch, 10, 0, self.bert)
        self.epoch += 1
        _sync(self.device)


def _init_buffers(model):
    """Buffers a state_dict may lack (benign keys), after building on the meta device."""
    from timm.layers import gen_relative_position_index
    from lib.model.backbone import WindowAttention
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.relative_position_index.copy_(gen_relative_position_index(m.window_size))
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None:
            m.num_batches_tracked.zero_()


class OursVariant:
    """lib.training.engine.train_one_epoch with the options of the variant, the way train.py sets them up."""

    def __init__(self, model_sd, bert_template, cfg, base, options, batch, device, compile_backend='inductor'):
        flags = ['--swin_type', cfg['swin_type'], '--img_size', str(cfg['img_size']), '--window12',
                 '--pretrained_swin_weights', '']
        flags += ['--amp'] if base == 'bf16' else []
        flags += ['--compile', compile_backend] if 'compile' in options else []
        flags += ['--fused_adamw'] if 'fused_adamw' in options else []
        flags += ['--channels_last'] if 'channels_last' in options else []
        flags += ['--checkpoint_activations'] if 'checkpoint' in options else []
        flags += ['--cuda_graphs', '--device', str(device)] if 'cudagraphs' in options else []
        self.args = args = utils.get_parser().parse_args(flags)
        with torch.device('meta'), _quiet():
            model = segmentation.lavt('', args, text_dim=_width(cfg))
        model = model.to_empty(device=device)
        _init_buffers(model)
        load_weights(model, model_sd, 'the original', 'model')  # strict: every key, every shape
        bert = copy.deepcopy(bert_template).to(device)
        groups = build_param_groups(model, bert)
        freeze_unoptimized({'model': model, 'bert': bert}, groups)
        self.model, self.bert, self.device, self.amp = model, bert, device, args.amp
        self.cudnn_benchmark = 'cudnn_benchmark' in options
        self.optimizer = build_optimizer(groups, args)
        self.scheduler = build_poly_scheduler(self.optimizer, 10 ** 7)
        if 'ddp' in options:  # as train.py wraps them under torchrun (needs single_process_group)
            from lib.training.distributed import DistEnv
            env = DistEnv(True, 0, 1, device.index or 0, device)
            model, bert = wrap_for_distributed(model, env), wrap_for_distributed(bert, env)
        self.step = compile_step(engine.supervised_step(model, bert, build_criterion().to(device)), args,
                                 distributed='ddp' in options)
        self.update = build_update(self.step, self.optimizer, args, device)  # +cudagraphs
        pin = 'pin_mem' in options and device.type == 'cuda'  # pinning needs a GPU
        self.batch = {k: v.pin_memory() for k, v in batch.items()} if pin else batch
        model.train()
        bert.eval()

    def modules(self):
        return [self.model, self.bert]

    def run(self, n):
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            engine.train_one_epoch(self.step, [self.batch] * n, self.optimizer, self.scheduler, 0,
                                   device=self.device, print_freq=10, amp=self.amp, update=self.update)
            _sync(self.device)
        finally:
            torch.backends.cudnn.benchmark = saved

    def count_flops(self):
        """FLOPs of one forward + backward (no optimizer step; gradients cleared afterwards). The rotated
        convolutions run as one dense convolution per sample meanwhile (the same FLOPs): FlopCounterMode
        counts the backward of a grouped convolution `groups` times over (torch 2.x)."""
        from torch.utils.flop_counter import FlopCounterMode
        from lib.model.decoder import AdaptiveRotatedConv2d
        rotated = [m for m in self.model.modules() if isinstance(m, AdaptiveRotatedConv2d)]
        saved = [m.channels_last for m in rotated]
        batch = engine.to_device(self.batch, self.device)
        try:
            for m in rotated:
                m.channels_last = True
            with FlopCounterMode(display=False) as counter:
                with engine.autocast(self.device, self.amp):
                    loss = self.step(batch)
                loss.backward()
        finally:
            for m, value in zip(rotated, saved):
                m.channels_last = value
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# memory

class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storages alive on the CPU, and their peak, while active: each storage an operator
    allocates is counted once, until it is freed (a weakref callback); views of storages from before are
    not. `tensors`: those alive before, to count as well. What an operator allocates and frees inside its
    kernel is not seen (as on a GPU, workspaces)."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        for t in tensors:
            self._count(t)
        self.peak = self.now

    def reset_peak(self):
        self.peak = self.now

    @staticmethod
    def _storage(t):
        if not isinstance(t, torch.Tensor) or t.device.type != 'cpu':
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or functional wrappers
            return None
        return storage if storage.data_ptr() else None

    def _count(self, t, skip=()):
        storage = self._storage(t)
        key = storage.data_ptr() if storage is not None else None
        if key is not None and key not in self.live and key not in skip:
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or in-place result shares an input's storage: allocated before, counted (or not) then
        inputs = {s.data_ptr() for s in map(self._storage, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            self._count(t, skip=inputs)
        self.peak = max(self.peak, self.now)
        return out


def saved_activation_bytes(variant):
    """Bytes autograd keeps for backward during one iteration (each storage counted once; weights, which
    layers also save, are counted in the state)."""
    weights = {t.untyped_storage().data_ptr() for m in variant.modules()
               for t in list(m.parameters()) + list(m.buffers())}
    storages = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                storages[ptr] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        variant.run(1)
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------------------
# the comparison

def device_peak_tflops(device, peak_tflops=None):
    """(bf16, fp32) dense peak TFLOPS: --peak_tflops if given, else the table for H100 / H200."""
    if peak_tflops:
        return (peak_tflops[0], peak_tflops[-1])
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS:
            if key in name:
                return peaks
    return None


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU, {torch.get_num_threads()} threads'


def run_comparison(config, *, device, original=None, variants=None, warmup=2, rounds=3, iters=3,
                   peak_tflops=None, log=print, deadline=None, name=None, same_model_check=True,
                   compile_backend='inductor'):
    """Build every variant of `config` (a CONFIGS key or dict), warm each up, time them alternating.
    -> figures {'config', 'device', 'flops_per_step', variant: {...}}. `original`: import_original(...)
    or None (ours only). `deadline`: perf_counter time after which no further variant is built.
    `compile_backend`: torch.compile's backend for the +compile variants."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    cfg = dict(CONFIGS[config]) if isinstance(config, str) else dict(config)
    name = name or (config if isinstance(config, str) else 'custom')
    names = variants or DEFAULT_VARIANTS['cuda' if device.type == 'cuda' else 'cpu'].split(',')
    parsed = {v: parse_variant(v) for v in names}
    if original is None:
        names = [v for v in names if not parsed[v][0].startswith('original')]
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True  # both codes enable TF32
        torch.backends.cudnn.allow_tf32 = True
    batch = synthetic_batch(cfg)
    figures = {'config': name, **cfg, 'device': device_name(device), 'warmup': warmup, 'rounds': rounds,
               'iters': iters, 'variants': {}}
    log(f'{name}: swin-{cfg["swin_type"]} {cfg["img_size"]} px batch {cfg["batch"]}, BERT {_width(cfg)}x'
        f'{cfg["bert_layers"]}, on {figures["device"]}')

    orig_model, orig_bert, model_sd, bert_template = prepare_weights(cfg, original)
    if original is not None and same_model_check:
        figures['max_abs_logit_diff'] = check_same_model(orig_model, orig_bert, model_sd, bert_template, cfg, batch)
        log(f'{name}: same weights, eval mode: max |logits(original) - logits(ours)| = '
            f'{figures["max_abs_logit_diff"]:.2e}')

    # Phase 1: everything but torch.compile, timed alternating. Phase 2: the compiled variants, timed
    # alternating with their eager twins (the same variant without compile, else its base). Compiling
    # leaves a large heap behind, which would slow the original's per-iteration gc.collect: so the
    # original is timed before anything is compiled, and a compiled variant's speed-up over it goes
    # through its twin (t_original / t_twin x t_twin / t_compiled).
    phase2 = [v for v in names if 'compile' in parsed[v][1]]
    phase1 = [v for v in names if v not in phase2]
    built, times = {}, {}
    with single_process_group(device) if any(parsed[v][0] == 'original' or 'ddp' in parsed[v][1] for v in names) \
            else contextlib.nullcontext():
        for phase in (phase1, phase2):
            for v in phase:
                built_v = _try_build(v, parsed[v], original, orig_model, orig_bert, model_sd, bert_template, cfg,
                                     batch, device, warmup, figures, log, deadline, compile_backend)
                if built_v is not None:
                    built[v] = built_v
            if phase is phase1 and any(v.startswith('original') for v in built):
                gc.collect()
                start = time.perf_counter()
                gc.collect()
                figures['gc_collect_ms'] = 1000 * (time.perf_counter() - start)
                log(f'{name}: gc.collect() in this process takes {figures["gc_collect_ms"]:.0f} ms '
                    f'(the original calls it every iteration)')
            if phase is phase1:
                timed = [v for v in phase1 if v in built]
            else:
                timed = [v for v in phase2 if v in built]
                timed += sorted({_twin_of(v, parsed, built) for v in timed} - {None})
            _time_alternating({v: built[v] for v in timed}, rounds, iters, times, tag=phase is phase2)

    peaks = device_peak_tflops(device, peak_tflops)
    flops = figures.get('flops_per_step')
    reference = statistics.median(times['original', False]) if ('original', False) in times else None
    for v in [v for v in names if v in built]:
        phase2_v = v in phase2
        s = statistics.median(times[v, phase2_v])
        entry = figures['variants'][v]
        entry.update(s_per_it=s, it_per_s=1 / s, images_per_s=cfg['batch'] / s, round_s_per_it=times[v, phase2_v])
        base = _twin_of(v, parsed, built) if phase2_v else None
        if reference and not phase2_v:
            entry['speedup_vs_original'] = reference / s
        if base is not None and (base, True) in times:
            entry['speedup_vs_' + base] = statistics.median(times[base, True]) / s
            if reference and (base, False) in times:
                entry['speedup_vs_original'] = (reference / statistics.median(times[base, False])
                                                * statistics.median(times[base, True]) / s)
        if flops and peaks:
            peak = peaks[0] if parsed[v][0] == 'bf16' else peaks[1]
            entry['mfu'] = flops / s / (peak * 1e12)
        log(format_row(name, v, entry))
    if peaks:
        figures['peak_tflops_bf16_tf32'] = list(peaks)
    compiled = any('compile' in parsed[v][1] for v in built)
    del built
    if compiled:
        torch._dynamo.reset()  # its caches hold on to the compiled variants
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return figures


_WEIGHTS = {}


def prepare_weights(cfg, original=None):
    """The same weights for every variant: the original's (random) models, their state_dict and our BERT
    loaded from the original's (ours alone: our random model). On the CPU; kept for the next call with
    the same architecture. -> (original model | ours, original BERT | None, model state_dict, our BERT)"""
    key = (cfg['swin_type'], cfg['img_size'], cfg['bert_layers'], _width(cfg), id(original))
    if original is not None and _width(cfg) != BERT_WIDTH:
        raise utils.InputError(f'the original takes BERT width {BERT_WIDTH} only, not {_width(cfg)}')
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        if original is not None:
            orig_model, orig_bert = build_original(original, cfg)
        else:
            args = utils.get_parser().parse_args(['--swin_type', cfg['swin_type'], '--img_size',
                                                  str(cfg['img_size']), '--window12', '--pretrained_swin_weights', ''])
            torch.manual_seed(0)
            with _quiet():
                orig_model, orig_bert = segmentation.lavt('', args, text_dim=_width(cfg)), None
        model_sd = {k: v.detach().clone() for k, v in orig_model.state_dict().items()}
        _WEIGHTS[key] = orig_model, orig_bert, model_sd, _our_bert(cfg, orig_bert)
    return _WEIGHTS[key]


def _width(cfg):
    return cfg.get('bert_width', BERT_WIDTH)


def _twin_of(v, parsed, built):
    """The eager variant a compiled one is timed against: the same options without compile, else its base."""
    base, options = parsed[v]
    for other in built:
        if parsed[other] == (base, options - {'compile', 'cudagraphs'}):
            return other
    return base if base in built else None


def _try_build(v, parsed_v, original, orig_model, orig_bert, model_sd, bert_template, cfg, batch, device, warmup,
               figures, log, deadline, compile_backend='inductor'):
    name = figures['config']
    base, options = parsed_v
    # a compile takes a minute or two: it starts only with that much time left
    if deadline is not None and time.perf_counter() > deadline - (COMPILE_RESERVE_S if 'compile' in options else 0):
        log(f'{name} {v}: skipped (time budget used up)')
        figures['variants'][v] = {'skipped': 'time budget'}
        return None
    out_of_memory = False
    try:
        return _build_and_warm(v, base, options, original, orig_model, orig_bert, model_sd, bert_template, cfg,
                               batch, device, warmup, figures, log, compile_backend)
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    except Exception as e:
        figures['variants'][v] = {'error': f'{type(e).__name__}: {e}'}
        log(f'{name} {v}: FAILED {type(e).__name__}: {e}')
    if out_of_memory:  # outside the except block, so that the failed step's tensors can be freed
        figures['variants'][v] = {'error': 'out of memory'}
        log(f'{name} {v}: out of memory')
        gc.collect()
        torch.cuda.empty_cache()
    return None


def _time_alternating(variants, rounds, iters, times, tag):
    """rounds x (each variant for `iters` iterations) -> times[(name, tag)] = [seconds per iteration]."""
    for v in variants:
        times[v, tag] = []
    for _ in range(rounds):
        for v, variant in variants.items():
            start = time.perf_counter()
            variant.run(iters)
            times[v, tag].append((time.perf_counter() - start) / iters)


@torch.no_grad()
def check_same_model(orig_model, orig_bert, model_sd, bert_template, cfg, batch):
    """Max |logits difference| of the original and ours with the same weights, eval mode, on the CPU,
    first sample of the batch."""
    args = utils.get_parser().parse_args(['--swin_type', cfg['swin_type'], '--img_size', str(cfg['img_size']),
                                          '--window12', '--pretrained_swin_weights', ''])
    with torch.device('meta'), _quiet():
        ours = segmentation.lavt('', args, text_dim=_width(cfg))
    ours = ours.to_empty(device='cpu')
    _init_buffers(ours)
    load_weights(ours, model_sd, 'the original', 'model')
    image, ids, mask = batch['image'][:1], batch['input_ids'][:1], batch['attention_mask'][:1]
    was_training = orig_model.training
    orig_model.eval()
    try:
        hidden = orig_bert(ids, attention_mask=mask)[0]
        theirs = orig_model(image, hidden.permute(0, 2, 1), mask.unsqueeze(-1))
    finally:
        orig_model.train(was_training)
    mine = segment(ours.eval(), bert_template, image, ids, mask)
    return (theirs - mine).abs().max().item()


def _our_bert(cfg, orig_bert):
    """Our BERT (transformers) with the original BERT's weights (strict), on the CPU."""
    from transformers import BertConfig, BertModel
    width = _width(cfg)
    config = BertConfig(vocab_size=30522, hidden_size=width, num_hidden_layers=cfg['bert_layers'],
                        num_attention_heads=max(1, width // 64), intermediate_size=4 * width)
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False)
    bert.pooler = None
    if orig_bert is not None:
        load_weights(bert, orig_bert.state_dict(), 'the original', 'bert_model')
    return bert.eval()


def _build_and_warm(v, base, options, original, orig_model, orig_bert, model_sd, bert_template, cfg, batch,
                    device, warmup, figures, log, compile_backend='inductor'):
    cuda = device.type == 'cuda'
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    # on the CPU, every tensor from the build on is followed (not with compile: it would be traced too)
    tracker = PeakTensorMemory(batch.values()) if not cuda and 'compile' not in options else None
    start = time.perf_counter()
    with tracker if tracker is not None else contextlib.nullcontext():
        if base.startswith('original'):
            variant = OriginalVariant(original, copy.deepcopy(orig_model), copy.deepcopy(orig_bert), batch, device,
                                      ddp=base == 'original')
        else:
            variant = OursVariant(model_sd, bert_template, cfg, base, options, batch, device, compile_backend)
        defaults = [group.get('foreach') for group in variant.optimizer.param_groups]
        if tracker is not None:
            for group in variant.optimizer.param_groups:  # the multi-tensor AdamW a GPU runs by default
                if group.get('foreach') is None and not group.get('fused'):
                    group['foreach'] = True
        for _ in range(warmup):
            variant.run(1)
    for group, foreach in zip(variant.optimizer.param_groups, defaults):  # timed with the CPU's own choice
        group['foreach'] = foreach
    entry = {'warmup_s': time.perf_counter() - start}
    if cuda:
        entry['peak_allocated_gib'] = (torch.cuda.max_memory_allocated(device) - allocated) / 2 ** 30
        entry['peak_reserved_gib'] = (torch.cuda.max_memory_reserved(device) - reserved) / 2 ** 30
    elif tracker is not None:
        entry['peak_allocated_gib'] = tracker.peak / 2 ** 30
        entry['activations_gib'] = saved_activation_bytes(variant) / 2 ** 30
    if not base.startswith('original') and not options & {'compile', 'checkpoint'} and 'flops_per_step' not in figures:
        figures['flops_per_step'] = variant.count_flops()  # (after the memory figures: it runs a step)
        log(f'{figures["config"]}: model FLOPs per training step {figures["flops_per_step"] / 1e12:.3f} TFLOP '
            f'(forward + backward, torch.utils.flop_counter)')
    figures['variants'][v] = entry
    return variant


def format_row(config, v, e):
    mem = ''
    if 'peak_reserved_gib' in e:
        mem = f'peak {e["peak_allocated_gib"]:.2f} GiB allocated ({e["peak_reserved_gib"]:.2f} reserved)'
    elif 'peak_allocated_gib' in e:
        mem = f'peak {e["peak_allocated_gib"]:.2f} GiB of tensors ({e["activations_gib"]:.2f} saved for backward)'
    speedup = f'{e["speedup_vs_original"]:.2f}x original' if 'speedup_vs_original' in e else ''
    speedup += ''.join(f' ({e[k]:.2f}x {k[len("speedup_vs_"):]})' for k in e
                       if k.startswith('speedup_vs_') and k != 'speedup_vs_original')
    mfu = f'MFU {100 * e["mfu"]:.1f}%' if 'mfu' in e else ''
    return (f'{config} {v:<28} {e["it_per_s"]:7.3f} it/s {e["images_per_s"]:7.2f} img/s  '
            + '  '.join(x for x in (speedup, mem, mfu, f'warm-up {e["warmup_s"]:.0f} s') if x))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--original_dir', default='', help='a clone of AHideoKuzeA/LRB-WREL (omit: ours only)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--configs', default='', help=f'comma-separated, of {", ".join(CONFIGS)} '
                   '(default: paper,throughput on a GPU, small on a CPU)')
    p.add_argument('--variants', default='', help='comma-separated (default: the device\'s list in '
                   'DEFAULT_VARIANTS); BASE[+OPTION...], BASE in original, original_no_ddp, fp32, bf16')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations per variant (compiles happen here)')
    p.add_argument('--rounds', type=int, default=3, help='alternating timing rounds')
    p.add_argument('--iters', type=int, default=3, help='iterations per variant and round')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--peak_tflops', type=float, nargs='+', default=None, metavar='TFLOPS',
                   help='dense peak of the device: BF16 [FP32/TF32] (known for H100 and H200)')
    p.add_argument('--json', default='', help='write all figures here')
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise utils.InputError(f'--device {args.device}: no CUDA device here (use --device cpu)')
    if min(args.rounds, args.iters) < 1 or args.warmup < 0:
        raise utils.InputError('--rounds and --iters must be >= 1, --warmup >= 0')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = [c for c in args.configs.split(',') if c] or (['paper', 'throughput'] if device.type == 'cuda'
                                                             else ['small'])
    for c in configs:
        if c not in CONFIGS:
            raise utils.InputError(f'--configs {c}: one of {", ".join(CONFIGS)}')
    variants = [v for v in args.variants.split(',') if v] or None
    for v in variants or ():
        parse_variant(v)
    original = import_original(args.original_dir) if args.original_dir else None
    results = {c: run_comparison(c, device=device, original=original, variants=variants, warmup=args.warmup,
                                 rounds=args.rounds, iters=args.iters, peak_tflops=args.peak_tflops)
               for c in configs}
    if args.json:
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=2, default=str))
        print(f'figures written to {args.json}')


if __name__ == '__main__':
    utils.run_cli(main)
