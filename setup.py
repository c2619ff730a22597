import sys

from setuptools import Extension, setup

# The CPU inference kernel of CoordAttention (timm_coordatt/native.py). Optional: without a C compiler
# the package installs without it and runs the same block with PyTorch ops.
compile_args = [] if sys.platform == 'win32' else ['-O3', '-fopenmp-simd', '-fno-math-errno', '-fno-trapping-math']

setup(
    ext_modules=[Extension(
        'timm_coordatt._native', ['timm_coordatt/csrc/coord_attention.c'],
        extra_compile_args=compile_args + ([] if sys.platform == 'win32' else ['-pthread']),
        extra_link_args=[] if sys.platform == 'win32' else ['-pthread'],
        libraries=['dl'] if sys.platform.startswith('linux') else [],  # dlsym; part of libc from glibc 2.34
        optional=True,
    )],
)
