"""The optimizer and learning-rate schedule of the reference: its four AdamW parameter groups, the
parameters it never updates, and the poly schedule stepped once per iteration.

Faithful details worth knowing:
- Only backbone, classifier and the first 10 BERT encoder layers are optimized (BERT embeddings and
  layers >= 10 never change). `freeze_unoptimized` turns their gradients off, which changes nothing
  numerically and spares the backward pass and the gradient all-reduce.
"""
import torch

from lib.model.build import text_encoder_of
from utils import unwrap_module as unwrap


NO_DECAY_KEYWORDS = ('norm', 'absolute_pos_embed', 'relative_position_bias_table')


NUM_BERT_LAYERS_TRAINED = 10


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
    """AdamW of the reference (`lr` default: --lr). Its multi-tensor path (`foreach`: one call per group of
    tensors instead of ~a dozen ops per parameter) on every device: PyTorch takes it by default only on a
    GPU, and on the CPU it runs the per-parameter loop. `--fused_adamw`: its fused kernel instead (one
    launch for all tensors; CUDA and CPU). All three give the same update up to rounding. The path chosen
    here also holds after `load_state_dict`, which would otherwise take the one the checkpoint was saved
    with.

    `--cuda_graphs`: the step must replay inside a CUDA graph, so nothing in it may read the host: AdamW's
    `capturable` path (its step count on the device) and each group's learning rate a device tensor, which
    the schedule fills in place between replays. State dicts keep plain float learning rates, so
    checkpoints load either way (and into the original code)."""
    fused = bool(getattr(args, 'fused_adamw', False))
    graphs = bool(getattr(args, 'cuda_graphs', False))
    options = {'fused': True} if fused else {'foreach': True, **({'capturable': True} if graphs else {})}
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr if lr is None else lr, weight_decay=args.weight_decay,
                                  amsgrad=args.amsgrad, **options)
    optimizer.register_load_state_dict_post_hook(_keep_implementation(fused, graphs))
    if graphs:
        _device_learning_rates(optimizer)
        optimizer.register_state_dict_post_hook(_float_learning_rates)
    return optimizer


def _device_learning_rates(optimizer):
    """Each group's 'lr' as a 0-dim float32 tensor on its parameters' device (value kept). The schedule's
    base stays the exact float ('initial_lr', which LambdaLR takes as it finds it)."""
    for group in optimizer.param_groups:
        device = group['params'][0].device if group['params'] else 'cpu'
        group.setdefault('initial_lr', float(group['lr']))
        group['lr'] = torch.tensor(float(group['lr']), dtype=torch.float32, device=device)


def _float_learning_rates(optimizer, state_dict):
    for group in state_dict['param_groups']:
        for key in ('lr', 'initial_lr'):
            if torch.is_tensor(group.get(key)):
                group[key] = float(group[key])
    return state_dict


def _keep_implementation(fused, capturable=False):
    def hook(optimizer):
        for group in optimizer.param_groups:
            group['fused'] = True if fused else None
            group['foreach'] = None if fused else True
            group['capturable'] = capturable and not fused
            for p in group['params']:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get('step')):
                    # fused and capturable keep the step count on the parameter's device; the others on
                    # the host, where reading it for the bias correction needs no device sync
                    on_device = fused or capturable
                    device, dtype = (p.device, torch.float32) if on_device else ('cpu', torch.get_default_dtype())
                    state['step'] = state['step'].to(device=device, dtype=dtype)
        if capturable:
            _device_learning_rates(optimizer)
    return hook


def poly_factor(iteration, total_iters, power=0.9):
    """(1 - it / total) ** 0.9, clamped at 0 past the end."""
    return max(0.0, 1.0 - iteration / max(1, total_iters)) ** power


def build_poly_scheduler(optimizer, total_iters, power=0.9):
    """LambdaLR stepped once per iteration; total = iterations per epoch x epochs. The base learning rates
    are plain floats also when the groups hold device tensors (--cuda_graphs): the schedule then fills
    those tensors in place."""
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', float(group['lr']))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_factor(it, total_iters, power))
