"""Teach the Triton interpreter (``TRITON_INTERPRET=1``) to compute bfloat16 by value.

The interpreter stores a bf16 tensor as its uint16 bit pattern and, in Triton 3.6-3.8, runs
``tl.dot``, elementwise arithmetic, comparisons, casts to and from other types and min/max/sum
reductions on that storage (and has no bf16 constants at all), so a bf16 kernel returns values around
1e10 on CPU while the same kernel is right on a GPU (triton-lang/triton#11584 and #10945; upstream
does not support bf16 there yet).
That left bf16, the dtype Twins trains in, checkable only on a GPU.

``enable()`` wraps those builder operations: a bf16 operand is widened to fp32 exactly, the operation
runs in fp32, and a bf16 result is rounded back to nearest-even, which is what the GPU's bf16 units
and Triton's own bf16 casts do (a single add, multiply or fma of bf16 values in fp32 followed by one
rounding is correctly rounded). Operations on other dtypes go to the interpreter's own code untouched.
``twins_kernels.ops`` calls it when the interpreter is on; it is idempotent.
"""
from __future__ import annotations

import functools

import numpy as np

BF16_EXPONENT_SHIFT = 16
QUIET_NAN_BIT = 0x0040


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bf16 bit patterns (exact: bf16 is the top half of a float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << BF16_EXPONENT_SHIFT).view(np.float32)


def fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns of float32 values, rounded to nearest-even; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)  # uint64: the rounding add must not wrap
    lsb = (bits >> BF16_EXPONENT_SHIFT) & 1
    rounded = ((bits + 0x7FFF + lsb) >> BF16_EXPONENT_SHIFT).astype(np.uint16)
    nan = (bits >> BF16_EXPONENT_SHIFT).astype(np.uint16) | QUIET_NAN_BIT
    return np.where(np.isnan(values), nan, rounded)


def enable() -> bool:
    """Patch the interpreter's builder and reductions; False when this Triton has no interpreter to patch."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    needed = ("binary_op", "unary_op", "create_fma", "create_dot", "cast_impl")
    if builder is None or reduce_ops is None or not all(hasattr(builder, name) for name in needed):
        return False
    if getattr(builder, "_twins_kernels_bf16", False):
        return True
    TensorHandle = interpreter.TensorHandle

    def is_bf16(handle) -> bool:
        return handle.dtype.scalar == tl.bfloat16

    def values(handle) -> np.ndarray:
        return bf16_to_fp32(handle.data) if is_bf16(handle) else handle.data

    def bf16_result(output: np.ndarray):
        """Round a float result back to bf16; a comparison's booleans are int1 (the interpreter would
        label them bf16, and a later cast would then read them as bf16 bit patterns)."""
        if output.dtype == np.bool_:
            return TensorHandle(output, tl.int1)
        return TensorHandle(fp32_to_bf16(output), tl.bfloat16)

    def by_value(original, compute):
        @functools.wraps(original)
        def patched(self, *handles, **kwargs):
            if not any(is_bf16(h) for h in handles if isinstance(h, TensorHandle)):
                return original(self, *handles, **kwargs)
            return compute(self, *handles, **kwargs)
        return patched

    def binary_op(self, lhs, rhs, op):
        return bf16_result(op(values(lhs), values(rhs)))

    def unary_op(self, arg, op):
        return bf16_result(op(values(arg)))

    def create_fma(self, x, y, z):
        output = values(x) * values(y) + values(z)
        return bf16_result(output) if is_bf16(z) else TensorHandle(output, z.dtype.scalar)

    def create_rsqrt(self, arg):
        return bf16_result(1 / np.sqrt(values(arg)))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # Tensor cores multiply bf16 exactly and accumulate in fp32, as this matmul does.
        accumulator = values(d).astype(np.float32)
        output = np.matmul(values(a), values(b), dtype=np.float32) + accumulator
        return bf16_result(output) if is_bf16(d) else TensorHandle(output, d.dtype.scalar)

    original_cast = builder.cast_impl

    @functools.wraps(original_cast)
    def cast_impl(self, src, dst_type):
        src_bf16, dst_bf16 = is_bf16(src), dst_type.scalar == tl.bfloat16
        if src_bf16 == dst_bf16:  # no bf16 on either side, or bf16 to bf16
            return original_cast(self, src, dst_type)
        if dst_bf16:
            return TensorHandle(fp32_to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        return TensorHandle(bf16_to_fp32(src.data).astype(interpreter._get_np_dtype(dst_type)), dst_type.scalar)

    def get_bf16(self, value):
        # A bf16 constant (``x * 8`` with bf16 x); the interpreter has none.
        return TensorHandle(fp32_to_bf16(np.array([value], dtype=np.float32)), tl.bfloat16)

    if not hasattr(builder, "get_bf16"):
        builder.get_bf16 = get_bf16
    builder.binary_op = by_value(builder.binary_op, binary_op)
    builder.unary_op = by_value(builder.unary_op, unary_op)
    builder.create_fma = by_value(builder.create_fma, create_fma)
    builder.create_rsqrt = by_value(builder.create_rsqrt, create_rsqrt)
    builder.create_dot = by_value(builder.create_dot, create_dot)
    builder.cast_impl = cast_impl
    # The class attributes create_fadd = lambda self, ...: self.binary_op(...) look binary_op up at
    # call time, so they pick up the patched one.

    original_min_max, original_sum = reduce_ops.min_max, reduce_ops.sum

    @functools.wraps(original_min_max)
    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        value = input[0] if isinstance(input, tuple) else input
        if value.dtype.scalar != tl.bfloat16:
            return original_min_max(self, input, val_reduce_op, idx_reduce_op)
        widened = self.to_tensor(bf16_to_fp32(value.handle.data), tl.float32)
        result = original_min_max(self, widened, val_reduce_op, idx_reduce_op)

        def narrow(t):  # min/max pick an element, so narrowing back is exact
            data = fp32_to_bf16(t.handle.data)
            return self.to_tensor(data if t.type.is_block() else data.reshape(()), tl.bfloat16)

        if val_reduce_op and idx_reduce_op:
            return narrow(result[0]), result[1]
        return narrow(result) if val_reduce_op else result

    @functools.wraps(original_sum)
    def sum_(self, input):
        if input.dtype.scalar != tl.bfloat16:
            return original_sum(self, input)
        total = np.sum(bf16_to_fp32(input.handle.data), axis=self.axis, keepdims=self.keep_dims, dtype=np.float32)
        return self.to_tensor(fp32_to_bf16(total), tl.bfloat16)

    reduce_ops.min_max = min_max
    reduce_ops.sum = sum_
    builder._twins_kernels_bf16 = True
    return True
