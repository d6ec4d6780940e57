"""Import Triton if it is installed, so that op modules can define kernels either way.

Under ``TRITON_INTERPRET=1`` the interpreter is first taught bf16 arithmetic (``interpreter_bf16``), so
bf16 kernels give on CPU the values they give on a GPU.

Without Triton, ``triton.jit`` becomes a no-op decorator and ``tl.constexpr`` a plain marker:
the kernel functions still exist as Python functions, but the backend selection
(``twins_kernels.backend``) refuses the ``triton`` backend with the import error, so they never run.
"""
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") == "1":
        from . import interpreter_bf16

        interpreter_bf16.enable()
    TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
except Exception:  # not installed, or broken: the backend status reports the reason
    triton = SimpleNamespace(jit=lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=object)
    TRITON_DTYPES = {}

__all__ = ["TRITON_DTYPES", "triton", "tl"]
