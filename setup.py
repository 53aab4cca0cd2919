"""Build: compiles the Cython kernels in ext/ into engine._margin, engine._shm, engine._fills,
engine._wire and engine._portfolio.

Build directives live here and only here. ``MARGIN_ENGINE_DEBUG=1`` at build time turns
bounds and wraparound checks on and drops optimisation (``pip install -e .`` again to
switch back); ``MARGIN_ENGINE_MARCH`` picks the CPU (below).
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MARGIN_ENGINE_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
# MARGIN_ENGINE_MARCH: the CPU the kernels are compiled for. "native" (the default) is the
# build machine's: the engine is built where it runs (pinned processes on bare metal), and on
# x86-64 the compiler then uses AVX-512/AVX2 conversions and blends (the full pass: about 16
# ns an account with x86-64-v2, 12 with native; bench/kernel.py). Set it to x86-64-v2 for a
# build that must move between machines, or to "" for the compiler's default (the default
# off x86-64, where compilers disagree on what -march=native means).
# -ffp-contract=off: no fused multiply-adds, so every figure is bit for bit the same
# whatever the -march.
MARCH = os.environ.get("MARGIN_ENGINE_MARCH",
                       "native" if os.uname().machine in ("x86_64", "AMD64") else "")
cflags = ["-O0", "-g"] if DEBUG else ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]
if MARCH and not DEBUG:
    cflags.append(f"-march={MARCH}")


def kernel(name: str) -> Extension:
    return Extension(
        f"engine.{name}",
        sources=[f"ext/{name}.pyx"],
        include_dirs=["ext", numpy.get_include()],
        extra_compile_args=cflags,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


setup(
    ext_modules=cythonize(
        [kernel("_margin"), kernel("_shm"), kernel("_fills"), kernel("_wire"), kernel("_portfolio")],
        include_path=["ext"],
        compiler_directives=directives,
        build_dir="build/cython",
    ),
)
