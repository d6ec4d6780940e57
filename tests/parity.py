"""The parity harness every op's tests use: ``twins_kernels.testing`` plus asserting checks."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from twins_kernels.ops import poisoned_outputs
from twins_kernels.testing import DTYPE_IDS, TOLERANCE, make_tokens, module_parity_errors, rel_err

__all__ = [
    "DTYPE_IDS", "TOLERANCE", "assert_rel_close", "outermost_past_int32", "check_compiled_matches_eager",
    "check_module_parity", "check_op_against_reference", "check_trace_runs_other_sizes", "make_tokens", "rel_err",
]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    err = rel_err(actual, expected)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({DTYPE_IDS[dtype]})"
    return err


def check_op_against_reference(op, reference, inputs, dtype, zero_grad_inputs=()):
    """Run ``op`` on ``inputs`` (in dtype) and ``reference`` on float64 copies; compare the output and
    every input's gradient by relative error. The op's outputs are poisoned before it runs.
    ``zero_grad_inputs``: inputs whose gradient is analytically zero (both sides are rounding noise,
    so a relative error means nothing): their gradient must be tiny next to the output gradient.
    The reference's output gradient is the op's, rounded to dtype as the inputs are: what is measured is
    the op's error, not the rounding of its arguments (a bias gradient sums the output gradient, and
    where the sum cancels, the rounding of its terms alone can exceed the tolerance)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference(*inputs64)
    grad = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad)
    with poisoned_outputs():
        out = op(*inputs)
        out.backward(grad.to(dtype))
    assert rel_err(out, expected) <= TOLERANCE[dtype], "output"
    for index, (actual, reference_input) in enumerate(zip(inputs, inputs64)):
        if index in zero_grad_inputs:
            assert actual.grad.double().norm() <= TOLERANCE[dtype] * grad.norm(), f"gradient of input {index}"
        else:
            assert rel_err(actual.grad, reference_input.grad) <= TOLERANCE[dtype], f"gradient of input {index}"


def strided_with_nans(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a view of every other element of a tensor whose other elements are NaN: a kernel
    that reads it as if it were contiguous takes the NaNs in. Gradients reach ``t`` through the view."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]


def outermost_past_int32(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N, C) ``t``'s values in a view with dimension ``dim`` outermost (the other two packed in their
    order, as a permuted tensor is laid out) and a stride along ``dim`` large enough that its last index
    starts past element 2^31 (2^31 / (size - 1) or more): a kernel that multiplies that index by the
    stride in 32 bits wraps there. Of the storage (2^31 elements: memory allocated, not touched), the
    view's elements alone are written."""
    inner, innermost = (d for d in range(3) if d != dim)
    strides = [0, 0, 0]
    strides[innermost] = 1
    strides[inner] = t.shape[innermost]
    packed = t.shape[inner] * t.shape[innermost]
    strides[dim] = max(packed, -(-2**31 // (t.shape[dim] - 1)))
    storage = torch.empty((t.shape[dim] - 1) * strides[dim] + packed, dtype=t.dtype, device=t.device)
    return storage.as_strided(t.shape, strides).copy_(t.detach())


def check_module_parity(
    reference_module: torch.nn.Module,
    make_fused: Callable[[torch.nn.Module], torch.nn.Module],
    x: torch.Tensor,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> dict[str, float]:
    """Assert that ``make_fused(copy of reference_module in dtype)`` matches ``reference_module`` run
    in float64: output, input gradient and every parameter gradient within TOLERANCE[dtype]."""
    errors = module_parity_errors(reference_module, make_fused, x, size, dtype)
    tol = TOLERANCE[dtype]
    failed = {name: err for name, err in errors.items() if not err <= tol}
    assert not failed, f"relative errors above {tol:.0e} ({DTYPE_IDS[dtype]}): {failed}"
    return errors


def check_compiled_matches_eager(module: torch.nn.Module, inputs: list[tuple[torch.Tensor, tuple[int, int]]],
                                 backend: str, dynamic: bool | None = None, **tolerances) -> None:
    """Assert that torch.compile(fullgraph=True) of a block using ``module`` (so: no graph break) gives
    eager's output, input gradient and every parameter gradient on each (tokens, size) of ``inputs``
    (torch.testing.assert_close, with ``tolerances`` where the compiler may fuse differently). With
    ``dynamic=True`` (shapes as symbols, as a segmentation model fed several image sizes wants), every
    size must run on the one graph compiled for the first: a new size, padded or not, is no recompile
    (sizes of 1 excepted: dynamo specializes a dimension of size 0 or 1, so keep every size >= 2). Each run
    starts from the same seed: a module in training draws the same dropout compiled and eager."""
    def block(tokens, size):
        return module(tokens, size).relu() * 2

    def output_and_grads(fn, x, size):
        tokens = x.detach().requires_grad_()
        torch.manual_seed(0)
        out = fn(tokens, size)
        return out, torch.autograd.grad(out.sum(), [tokens, *module.parameters()])

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True, backend=backend, dynamic=dynamic)
    for x, size in inputs:
        expected = output_and_grads(block, x, size)
        torch.testing.assert_close(output_and_grads(compiled, x, size), expected, **tolerances)
    if dynamic:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 1, f"{graphs} graphs compiled for sizes {[size for _, size in inputs]}: a new size recompiled"


class TokensOfImage(torch.nn.Module):
    """``module`` run on an image (B, C, H, W) as tokens, with the map size taken from the image's shape as
    timm's models take it: a trace records it as computed from the input, a 0-d tensor per side."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, image):
        return self.module(image.flatten(2).transpose(1, 2), image.shape[-2:])


def check_trace_runs_other_sizes(module: torch.nn.Module, shapes: list[tuple[int, int, int, int]]) -> None:
    """Assert that torch.jit.trace of ``module`` on images, traced at ``shapes[0]`` (B, C, H, W), gives the
    module's output at every shape, each run from the same seed (a module in training draws the same
    dropout): nothing of the traced size is recorded as a constant."""
    image_module = TokensOfImage(module)
    device = next(module.parameters()).device
    traced = torch.jit.trace(image_module, torch.randn(shapes[0], device=device), check_trace=False)
    for shape in shapes:
        image = torch.randn(shape, device=device)
        torch.manual_seed(7)
        expected = image_module(image)
        torch.manual_seed(7)
        torch.testing.assert_close(traced(image), expected)
