"""Finds or builds the compiled CUDA kernels (`_msda_cuda`).

Order: a module built by `ops/setup.py` (next to the package or installed top-level), then a JIT build
of `ops/src` with torch.utils.cpp_extension.load, cached in a build folder keyed by the Python, torch
and CUDA versions (torch rebuilds when the sources change). Nothing here runs for CPU tensors.
"""
import importlib
import os
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

EXTENSION_NAME = '_msda_cuda'  # the name ops/setup.py builds
OPS_DIR = Path(__file__).resolve().parents[1]
SOURCES = (OPS_DIR / 'src' / 'ms_deform_attn.cpp', OPS_DIR / 'src' / 'ms_deform_attn_cuda.cu')
EXTRA_CFLAGS = ['-O3']
EXTRA_CUDA_CFLAGS = ['-O3']

_PACKAGE = __name__.rsplit('.functions', 1)[0]  # 'ops', or wherever the package was vendored
_cache = {'module': None, 'tried': False}


def default_build_dir():
    """Per-environment JIT cache: $LRB_MSDA_BUILD_DIR, else under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions."""
    if os.environ.get('LRB_MSDA_BUILD_DIR'):
        return Path(os.environ['LRB_MSDA_BUILD_DIR'])
    base = os.environ.get('TORCH_EXTENSIONS_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'torch_extensions')
    tag = f'py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}'
    if torch.cuda.is_available():  # torch's JIT cache does not track the target GPU: keep one build per arch
        tag += '_sm%d%d' % torch.cuda.get_device_capability()
    return Path(base) / ('lrb_msda_' + ''.join(c if c.isalnum() or c in '._' else '_' for c in tag))


def import_prebuilt():
    """The module built by ops/setup.py, or None."""
    for name in (f'{_PACKAGE}.{EXTENSION_NAME}', EXTENSION_NAME):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _cuda_library_flags():
    """-L for libcudart when CUDA_HOME (guessed from a wrapper `nvcc` on PATH) lacks it."""
    from torch.utils.cpp_extension import CUDA_HOME
    fallback = '/usr/local/cuda/lib64'
    if CUDA_HOME and not os.path.exists(os.path.join(CUDA_HOME, 'lib64', 'libcudart.so')) \
            and os.path.exists(os.path.join(fallback, 'libcudart.so')):
        return [f'-L{fallback}']
    return []


def load_extension(verbose=False, build_dir=None, arch_list=None):
    """JIT-compiles ops/src (cached) and returns the module.

    arch_list: TORCH_CUDA_ARCH_LIST for this build (e.g. "8.0;9.0"); default: torch's choice (the GPUs
    it sees). Raises RuntimeError when no CUDA toolkit is found. A GPU is not needed to compile.
    """
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError('ops.load_extension: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)')
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with mock.patch.dict(os.environ, {'TORCH_CUDA_ARCH_LIST': arch_list} if arch_list else {}):  # restored after
        return cpp_extension.load(
            name=EXTENSION_NAME, sources=[str(s) for s in SOURCES],
            extra_include_paths=[str(OPS_DIR / 'src')],
            extra_cflags=EXTRA_CFLAGS, extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            extra_ldflags=_cuda_library_flags(),
            build_directory=str(build_dir), verbose=verbose, with_cuda=True)


def get_extension():
    """The compiled module for CUDA tensors, or None (then callers use the PyTorch path).

    Tried once per process: a prebuilt module, then (unless LRB_MSDA_JIT=0) a JIT build. A failed build
    warns once and is not retried.
    """
    if not _cache['tried']:
        _cache['tried'] = True
        module = import_prebuilt()
        if module is None and os.environ.get('LRB_MSDA_JIT', '1') != '0' and torch.cuda.is_available():
            try:
                print(f'ops: loading the CUDA deformable-attention kernels (compiled into {default_build_dir()} '
                      'on first use, about a minute)', file=sys.stderr, flush=True)
                module = load_extension()
            except Exception as e:  # compiler missing or failing: stay correct, just slower
                warnings.warn(f'ops: could not build the CUDA deformable-attention kernels ({type(e).__name__}: '
                              f'{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the PyTorch path. '
                              'Build them with `cd ops && python setup.py build_ext --inplace`.', RuntimeWarning)
        _cache['module'] = module
    return _cache['module']
