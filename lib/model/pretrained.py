"""Weights from files: the one safe loader of torch files (`load_torch_file`: checkpoints, Swin weights,
banks), official Swin checkpoints into the backbone, and state_dicts saved by the reference code (or this
one) into a whole model.
"""
import argparse
import pickle
import re
from collections import Counter

import torch
from timm.layers import resize_rel_pos_bias_table_simple

import utils
from utils import InputError
from .cross_scale import TokenAttention, resize_token_proj, token_counts

# buffers an official Swin file carries that the model recomputes itself
_DERIVED_KEYS = ('relative_position_index', 'attn_mask')


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


def non_finite_tensors(obj, where=''):
    """Where (`['model']['layer.weight']`, in file order) the floating-point tensors inside `obj` (nested dicts,
    lists and tuples) hold NaN or inf."""
    if torch.is_tensor(obj):  # a finite sum means finite values (NaN and inf propagate): the fast path
        finite = not (obj.is_floating_point() or obj.is_complex()) or bool(torch.isfinite(obj.sum()))
        return [] if finite or torch.isfinite(obj).all() else [where]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [w for key, value in items for w in non_finite_tensors(value, f'{where}[{key!r}]')]


def load_torch_file(path, flag, trust=False):
    """Load a checkpoint on CPU. Tensors and plain containers only (weights_only), with
    argparse.Namespace allowed because the reference stores its args that way; `trust=True` allows
    arbitrary pickles (only for files you made). One-line errors: missing, a directory, not a torch
    file, truncated, naming the global the restricted loader refused, or naming the first tensor that
    holds NaN or inf (weights, optimizer states, banks: a diverged run's file is refused, not used)."""
    utils.check_input_file(path, flag)
    try:
        if not _looks_like_torch_file(path):
            raise InputError(f'{flag} {path}: not a torch checkpoint (neither the zip archive of torch.save '
                             f'nor a legacy torch file)')
        if trust:
            loaded = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = torch.load(path, map_location='cpu', weights_only=True)
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
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise InputError(f'{flag} {path}: not a readable torch checkpoint, perhaps truncated or damaged '
                         f'({type(e).__name__}: {_first_line(e)})') from None
    bad = non_finite_tensors(loaded)
    if bad:
        more = f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''
        raise InputError(f'{flag} {path}: non-finite values (NaN or inf) in {bad[0]}{more}, from a diverged '
                         f'run or a damaged file; refused')
    return loaded


def strip_prefix(state_dict, prefix='module.'):
    """Drop `prefix` from every key that has it (e.g. DDP's `module.`)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _groups(keys, limit=6):
    """Short summary of many keys: 'layers.*.fusion (48), cim.block.* (120), ...'."""
    counts = Counter('.'.join(re.sub(r'\d+', '*', k).split('.')[:3]) for k in keys)
    items = [f'{name} ({n})' for name, n in counts.most_common(limit)]
    if len(counts) > limit:
        items.append(f'... {len(counts) - limit} more groups')
    return ', '.join(items)


def swin_state_dict_from_checkpoint(checkpoint):
    """The backbone state_dict inside an official Swin / mmseg / MoBY checkpoint dict."""
    sd = checkpoint.get('state_dict', checkpoint.get('model', checkpoint))
    if not isinstance(sd, dict) or not sd:
        return {}
    sd = strip_prefix(sd, 'module.')
    if next(iter(sd)).startswith('backbone.'):  # UperNet checkpoints: keep the backbone only
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    if sorted(sd)[0].startswith('encoder'):  # MoBY: the online encoder
        sd = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}
    return sd


def load_swin_pretrained(backbone, path):
    """Load official Swin weights (`{'model': state_dict}`) into a MultiModalSwinTransformer.

    Non-strict, as the reference (mmcv load_checkpoint): the language / intra-scale / cross-scale
    modules and the per-stage norms stay randomly initialised, the classifier head is ignored.
    Relative position tables are resized bicubically when the window size differs (timm's
    `resize_rel_pos_bias_table_simple`, the same interpolation as the reference). Prints a
    report; returns it as a dict. Raises InputError for a missing / unreadable file or one
    whose tensors match nothing.
    """
    flag = '--pretrained_swin_weights'
    checkpoint = load_torch_file(path, flag)
    if not isinstance(checkpoint, dict):
        raise utils.InputError(f'{flag} {path}: expected a dict with a "model" state_dict')
    source = swin_state_dict_from_checkpoint(checkpoint)
    own = backbone.state_dict()
    loadable, mismatched, resized = {}, [], []
    for key, value in source.items():
        if key.endswith(_DERIVED_KEYS) or key not in own:
            continue
        target = own[key]
        if key.endswith('relative_position_bias_table') and value.shape != target.shape \
                and value.shape[1] == target.shape[1]:
            module = backbone.get_submodule(key.rsplit('.', 1)[0])
            value = resize_rel_pos_bias_table_simple(value, module.window_size, tuple(target.shape))
            resized.append(key)
        if value.shape != target.shape:
            mismatched.append(f'{key} {tuple(value.shape)} vs {tuple(target.shape)}')
            continue
        loadable[key] = value
    if not loadable:
        raise utils.InputError(f'{flag} {path}: no tensor matches this Swin backbone '
                               f'(wrong file or --swin_type?)')
    result = backbone.load_state_dict(loadable, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_DERIVED_KEYS + ('num_batches_tracked',))]
    unexpected = [k for k in source if k not in own and not k.endswith(_DERIVED_KEYS)]
    print(f'Swin weights {path}: loaded {len(loadable)} tensors'
          + (f', resized {len(resized)} relative position tables' if resized else ''))
    if missing:
        print(f'  not in the file (randomly initialised): {len(missing)}: {_groups(missing)}')
    if unexpected:
        print(f'  in the file but not in the model (ignored): {len(unexpected)}: {_groups(unexpected)}')
    for line in mismatched:
        print(f'  shape mismatch, skipped: {line}')
    return {'loaded': sorted(loadable), 'missing': missing, 'unexpected': unexpected,
            'mismatched': mismatched, 'resized': resized}


def _resize_token_mixers(model, state_dict):
    """Resample cross-scale token mixers saved at another input size (see lib/cross_scale.py)."""
    for name, module in model.named_modules():
        key = f'{name}.proj.weight'
        if not isinstance(module, TokenAttention) or key not in state_dict:
            continue
        weight, bias = state_dict[key], state_dict[f'{name}.proj.bias']
        if weight.shape == module.proj.weight.shape:
            continue
        side = round(weight.shape[0] ** 0.5)
        if side * side != weight.shape[0] or token_counts(side, side)[1] != weight.shape[1]:
            continue  # not a square-grid mixer: left for the strict load to report
        weight, bias = resize_token_proj(weight.float(), bias.float(), (side, side), module.grid)
        state_dict[key], state_dict[f'{name}.proj.bias'] = weight, bias
        print(f'{key}: resampled from a {side}x{side} to a {module.grid[0]}x{module.grid[1]} grid')


def load_reference_state_dict(model, state_dict):
    """Load a state_dict saved by the reference code (or by this code) with strict=True.

    Strips DDP `module.` prefixes, drops buffers the model keeps out of its state_dict (e.g. the
    `position_ids` of newer BERTs), resamples cross-scale token mixers saved for another image
    size. Raises InputError naming the first differences when the keys don't match.
    """
    state_dict = strip_prefix(dict(state_dict), 'module.')
    own_keys = set(model.state_dict())
    non_persistent = {n for n, _ in model.named_buffers()} - own_keys
    state_dict = {k: v for k, v in state_dict.items() if k not in non_persistent}
    _resize_token_mixers(model, state_dict)
    missing = [k for k in own_keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own_keys]
    if missing or unexpected:
        raise utils.InputError(
            f'checkpoint does not match the model: {len(missing)} missing ({_groups(missing, 3)}), '
            f'{len(unexpected)} unexpected ({_groups(unexpected, 3)}); check --swin_type / --model / --cross_scale')
    try:
        return model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatches
        shapes = [line.strip() for line in str(e).splitlines() if 'size mismatch' in line]
        raise utils.InputError(f'checkpoint does not match the model: {len(shapes)} shape mismatches, first: '
                               f'{shapes[0] if shapes else e}') from None
