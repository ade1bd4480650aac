"""Builds the CUDA kernels of multi-scale deformable attention.

    cd ops && python setup.py build_ext --inplace        # puts _msda_cuda*.so next to this file
    pip install --no-build-isolation ./ops              # or installs it as a top-level module

Target GPUs come from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"); without it torch builds for the GPUs it
sees. CPU users need none of this: the `ops` package falls back to its PyTorch implementation, and
on a GPU `ops.load_extension()` JIT-compiles the same sources when no built module is found.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = '_msda_cuda'  # ops/functions/extension.py imports this name
EXTRA_COMPILE_ARGS = {'cxx': ['-O3'], 'nvcc': ['-O3']}


def library_dirs():
    """/usr/local/cuda/lib64 when the CUDA_HOME torch guessed (from a wrapper `nvcc` on PATH) lacks libcudart."""
    fallback = '/usr/local/cuda/lib64'
    if CUDA_HOME and not os.path.exists(os.path.join(CUDA_HOME, 'lib64', 'libcudart.so')) \
            and os.path.exists(os.path.join(fallback, 'libcudart.so')):
        return [fallback]
    return []


def sources():
    return sorted(os.path.join('src', os.path.basename(p))
                  for p in glob.glob(os.path.join(HERE, 'src', '*.cpp')) + glob.glob(os.path.join(HERE, 'src', '*.cu')))


if __name__ == '__main__':
    os.chdir(HERE)  # source paths are relative to this folder
    setup(
        name='lrb-msda-cuda',
        version='1.0',
        description='Multi-scale deformable attention CUDA kernels (Deformable-DETR interface)',
        ext_modules=[CUDAExtension(EXTENSION_NAME, sources(), include_dirs=[os.path.join(HERE, 'src')],
                                   library_dirs=library_dirs(), extra_compile_args=EXTRA_COMPILE_ARGS)],
        cmdclass={'build_ext': BuildExtension},
    )
