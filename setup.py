"""Build hook for the optional C extension; the project metadata lives in pyproject.toml.

``boxloss._native`` holds the fused CPU loops of the IoU-family losses (plain C against the CPython
API, no PyTorch headers: it compiles in about a second). It is optional: without a C compiler the
install still succeeds and the losses run on eager PyTorch ops (``boxloss._kernels``).

``boxloss._nms_native`` holds the sequential greedy (D)IoU-NMS, weighted NMS and Soft-NMS loops of
``boxloss.nms`` (plain C as well, optional in the same way: without it NMS runs on PyTorch ops).
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
        ),
        Extension(
            "boxloss._nms_native",
            sources=["boxloss/_nms_native.c"],
            depends=["boxloss/_nms_native_kernel.h"],
            # the same flags: IEEE arithmetic without contraction, so the (D)IoU values equal the torch
            # path's bit for bit and values at the threshold decide alike
            extra_compile_args=["-O2", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
