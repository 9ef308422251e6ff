"""Build of the compiled boundary-evaluation kernel; everything else is declared in pyproject.toml.

``pip install -e .`` (or a wheel build) compiles ``densemtl/metrics/_boundary_core.c`` with the C compiler
Python was built with. It uses the CPython C API only, so no build-time dependency beyond setuptools.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "densemtl.metrics._boundary_core",
            sources=["densemtl/metrics/_boundary_core.c"],
            # keep float expressions as written (no fused multiply-add): single-precision NMS as the MEX kernel
            extra_compile_args=["-O3", "-ffp-contract=off"],
        )
    ]
)
