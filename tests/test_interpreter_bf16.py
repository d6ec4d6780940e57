"""twins_kernels.ops.interpreter_bf16: the Triton interpreter computes bf16 by value, as a GPU does."""
import os

import numpy as np
import pytest
import torch

import twins_kernels  # noqa: F401  (importing the package is what enables it under the interpreter)
from twins_kernels.ops._triton import tl, triton
from twins_kernels.ops.interpreter_bf16 import bf16_to_fp32, fp32_to_bf16

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def test_rounding_matches_torch():
    """Nearest-even on random values, exact ties, the largest finite values, subnormals, inf and NaN."""
    special = torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.3895e38, -3.3895e38, 1e-40,
                            -1e-41, float("inf"), float("-inf"), 3.4e38])
    values = torch.cat([torch.randn(10_000) * 10 ** torch.randint(-30, 30, (10_000,)).float(), special])
    expected = bits(values.to(torch.bfloat16))
    assert np.array_equal(fp32_to_bf16(values.numpy()), expected)
    assert np.isnan(bf16_to_fp32(fp32_to_bf16(np.array([np.nan], dtype=np.float32)))).all()
    assert np.array_equal(bf16_to_fp32(expected), values.to(torch.bfloat16).float().numpy())


@triton.jit
def bf16_ops_kernel(a_ptr, b_ptr, dot_ptr, fma_ptr, less_ptr, max_ptr, sum_ptr, cast_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    offsets = rows[:, None] * BLOCK + rows[None, :]
    a = tl.load(a_ptr + offsets)
    b = tl.load(b_ptr + offsets)
    tl.store(dot_ptr + offsets, tl.dot(a, b))
    tl.store(fma_ptr + offsets, a * b + a)
    tl.store(less_ptr + offsets, (a < b).to(tl.int8))
    tl.store(max_ptr + rows, tl.max(a, axis=1))
    tl.store(sum_ptr + rows, tl.sum(a, axis=1))
    tl.store(cast_ptr + offsets, (a * 8).to(tl.int32))


@needs_interpreter
def test_bf16_kernel_matches_torch():
    a = (torch.randn(16, 16) * 3).to(torch.bfloat16)
    b = (torch.randn(16, 16) * 3).to(torch.bfloat16)
    poison = {torch.float32: float("nan"), torch.bfloat16: float("nan"), torch.int8: -1, torch.int32: -2 ** 31}
    out = {name: torch.full((16, 16), poison[dtype], dtype=dtype) for name, dtype in
           [("dot", torch.float32), ("fma", torch.bfloat16), ("less", torch.int8), ("cast", torch.int32)]}
    row_max = torch.full((16,), float("nan"), dtype=torch.bfloat16)
    row_sum = torch.full((16,), float("nan"), dtype=torch.bfloat16)
    bf16_ops_kernel[(1,)](a, b, out["dot"], out["fma"], out["less"], row_max, row_sum, out["cast"], BLOCK=16)
    # products of bf16 values are exact in fp32; only the summation order may differ
    torch.testing.assert_close(out["dot"], a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["fma"], a * b + a, rtol=2 ** -8, atol=0)
    assert torch.equal(out["less"], (a < b).to(torch.int8)), "bf16 comparisons must compare values, not bits"
    assert torch.equal(row_max, a.amax(dim=1))
    torch.testing.assert_close(row_sum, a.float().sum(dim=1).to(torch.bfloat16), rtol=2 ** -8, atol=1e-2)
    assert torch.equal(out["cast"], (a.float() * 8).to(torch.int32))


@triton.jit
def bf16_full_reduction_kernel(a_ptr, max_ptr, sum_ptr, BLOCK: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, BLOCK))
    tl.store(max_ptr, tl.max(a))
    tl.store(sum_ptr, tl.sum(a))


@needs_interpreter
def test_bf16_reductions_to_a_scalar():
    a = (torch.randn(32) * 3).to(torch.bfloat16)
    row_max = torch.full((1,), float("nan"), dtype=torch.bfloat16)
    row_sum = torch.full((1,), float("nan"), dtype=torch.bfloat16)
    bf16_full_reduction_kernel[(1,)](a, row_max, row_sum, BLOCK=32)
    assert torch.equal(row_max[0], a.max())
    torch.testing.assert_close(row_sum[0], a.float().sum().to(torch.bfloat16), rtol=2 ** -8, atol=1e-2)
