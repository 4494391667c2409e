"""Build hook for the optional C extension; the project metadata lives in pyproject.toml.

``boxloss._native`` holds the fused CPU loops of the IoU-family losses (plain C against the CPython
API, no PyTorch headers: it compiles in about a second). It is optional: without a C compiler the
install still succeeds and the losses run on eager PyTorch ops (``boxloss._kernels``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "boxloss._native",
            sources=["boxloss/_native.c"],
            depends=["boxloss/_native_kernel.h"],
            # -O3 vectorises the pair loops; no -ffast-math: IEEE semantics keep the results equal to
            # the eager ops (and NaN/Inf checks working)
            extra_compile_args=["-O3", "-pthread", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
