"""Build: compiles the Cython kernels in ext/ into engine._margin, engine._shm, engine._fills
and engine._wire.

Build directives live here and only here. ``MARGIN_ENGINE_DEBUG=1`` at build time turns
bounds and wraparound checks on and drops optimisation (``pip install -e .`` again to
switch back).
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
cflags = ["-O0", "-g"] if DEBUG else ["-O3", "-march=x86-64-v2", "-fno-strict-aliasing"]
if os.uname().machine not in ("x86_64", "AMD64"):
    cflags = [f for f in cflags if not f.startswith("-march")]


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
        [kernel("_margin"), kernel("_shm"), kernel("_fills"), kernel("_wire")],
        include_path=["ext"],
        compiler_directives=directives,
        build_dir="build/cython",
    ),
)
