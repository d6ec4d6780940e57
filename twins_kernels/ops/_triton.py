"""Import Triton if it is installed, so that op modules can define kernels either way.

Under ``TRITON_INTERPRET=1`` the interpreter is first taught bf16 arithmetic (``interpreter_bf16``), so
bf16 kernels give on CPU the values they give on a GPU; on Triton 3.6 it is also mended to loop over
bounds passed at launch (``_index_scalar_arguments``); it patches the language once per launch rather
than at every helper call (``_patch_language_once_per_launch``), computes no overflow check that
nothing asserts (``_skip_unasserted_overflow_checks``) and keeps the NumPy dtype of each Triton type
(``_cache_numpy_dtypes``).

Without Triton, ``triton.jit`` becomes a no-op decorator and ``tl.constexpr`` a plain marker:
the kernel functions still exist as Python functions, but the backend selection
(``twins_kernels.backend``) refuses the ``triton`` backend with the import error, so they never run.
"""
import dataclasses
import functools
from types import SimpleNamespace

import torch

from ..backend import triton_interpret_enabled


def _index_scalar_arguments(interpreter) -> None:
    """Triton 3.6's interpreter holds a scalar kernel argument as a one-element array, and a loop over
    it (``range(0, M, BLOCK)``) calls ``int()`` on that array, which NumPy 2.4 refuses (only 0-d arrays
    convert), so every kernel with a loop bound set at launch failed there. Triton 3.8 squeezes the array
    first; this does the same on versions that do not."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_twins_kernels_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._twins_kernels_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_language_once_per_launch(interpreter, tl) -> None:
    """Triton's interpreter (3.6-3.8) patches triton.language for itself (``inspect.getmembers`` over tl,
    tl.tensor and tl.math) when a kernel launches, and again at every call of a ``@triton.jit`` helper
    inside it (``tl.zeros`` and ``tl.cdiv`` are helpers too), which finds those modules patched already
    and changes nothing. Helpers called in the kernels' loops spent 15-20% of the LSA and GSA kernels'
    interpreter time there. Within a launch, each set of language modules is now patched once."""
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if launch is None or patch_lang is None or getattr(launch, "_twins_kernels_once", False):
        return

    @functools.wraps(launch)
    def launch_patching_once(self, *args, **kwargs):
        scopes = {}

        def patch_lang_once(fn):
            # what _patch_lang patches: the language modules among the function's globals
            modules = tuple(id(value) for value in fn.__globals__.values() if value is tl or value is tl.core)
            if modules not in scopes:
                scopes[modules] = patch_lang(fn)
            return scopes[modules]

        interpreter._patch_lang = patch_lang_once
        try:
            return launch(self, *args, **kwargs)
        finally:
            interpreter._patch_lang = patch_lang

    launch_patching_once._twins_kernels_once = True
    interpreter.GridExecutor.__call__ = launch_patching_once


def _skip_unasserted_overflow_checks(interpreter) -> None:
    """Triton's interpreter (3.6-3.8) builds an overflow check for every add, sub and mul of 32-bit
    integers (the operands widened to int64, the result compared with the int32 range) and hands it to
    ``device_assert``, which drops it unless the builder's options have ``debug`` on, and the
    interpreter's never do: the kernels' index arithmetic spent about a third of their interpreter time
    on checks nothing asserted. With ``debug`` off, the interpreter's builder now skips them, as a GPU
    compile without ``debug`` drops them."""
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or options.debug or not getattr(options, "sanitize_overflow", False):
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _cache_numpy_dtypes(interpreter) -> None:
    """Triton's interpreter (3.6-3.8) finds a value's NumPy dtype in a table of 19 ``np.dtype`` it builds
    anew at every look-up, a tenth of the kernels' interpreter time; each Triton type's is now looked up
    once, by its name (which names the element type, and a pointer as one)."""
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "_twins_kernels_cached", False):
        return
    found = {}

    def numpy_dtype(triton_type):
        name = triton_type.name
        if name not in found:
            found[name] = original(triton_type)
        return found[name]

    numpy_dtype._twins_kernels_cached = True
    numpy_dtype.__wrapped__ = original
    interpreter._get_np_dtype = numpy_dtype


try:
    import triton
    import triton.language as tl

    if triton_interpret_enabled():
        from triton.runtime import interpreter

        from . import interpreter_bf16

        interpreter_bf16.enable()
        _index_scalar_arguments(interpreter)
        _patch_language_once_per_launch(interpreter, tl)
        _skip_unasserted_overflow_checks(interpreter)
        _cache_numpy_dtypes(interpreter)
    TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

    @triton.jit
    def scalar_value(arg, ACC: tl.constexpr):
        """The value of a float argument from ``common.scalar_arg`` for accumulator ACC: the one
        element of its tensor in fp64, else the float itself."""
        if ACC == tl.float64:
            value = tl.load(arg)
        else:
            value = arg
        return value

    # The attention backward's delta_i = sum_j P_ij dP_ij / sum_j P_ij, from the very P and dP that
    # dS = P (dP - delta) uses, not rowsum(dO * O): where P spreads over near-identical keys (timm's
    # zero-mode padded keys are all the qkv bias) or over few keys whose dP nearly agree, dP - delta
    # cancels and delta's error is amplified (by about 1 / the other keys' probability). O's rounding to
    # 16 bits put dq up to 1.8e-2 off in bf16 on an LSA window (NOTES 33) and 5.1e-1 on GSA's
    # (NOTES 34); in fp32, taking delta from O = P V put 12 of 200 draws of a mostly padded LSA window past
    # 1e-5, rowsum(P dP) alone 11, divided by rowsum(P) (the lse's rounding taken out) none (NOTES 37).
    @triton.jit
    def softmax_delta(weighted, total):
        """delta from rowsum(P dP) and rowsum(P); zero for a row with no probability (a cropped query),
        NaN where total is, or weighted is and total is not zero."""
        return tl.where(total == 0.0, 0.0, weighted / tl.where(total == 0.0, 1.0, total))
except Exception:  # not installed, or broken: the backend status reports the reason
    triton = SimpleNamespace(jit=lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=object)
    TRITON_DTYPES = {}
    scalar_value = softmax_delta = None

__all__ = ["TRITON_DTYPES", "scalar_value", "softmax_delta", "triton", "tl"]
