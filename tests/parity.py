"""The parity harness every op's tests use: ``twins_kernels.testing`` plus asserting checks."""
from __future__ import annotations

from collections.abc import Callable

import torch

from twins_kernels.testing import DTYPE_IDS, TOLERANCE, make_tokens, module_parity_errors, rel_err

__all__ = [
    "DTYPE_IDS", "TOLERANCE", "assert_rel_close", "check_compiled_matches_eager", "check_module_parity",
    "make_tokens", "rel_err",
]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    err = rel_err(actual, expected)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({DTYPE_IDS[dtype]})"
    return err


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


def check_compiled_matches_eager(module: torch.nn.Module, x: torch.Tensor, size: tuple[int, int], backend: str,
                                 **tolerances) -> None:
    """Assert that torch.compile(fullgraph=True) of a block using ``module`` (so: no graph break) gives
    eager's output, input gradient and every parameter gradient (torch.testing.assert_close, with
    ``tolerances`` where the compiler may fuse differently)."""
    def block(tokens):
        return module(tokens, size).relu() * 2

    def output_and_grads(fn):
        tokens = x.detach().requires_grad_()
        out = fn(tokens)
        return out, torch.autograd.grad(out.sum(), [tokens, *module.parameters()])

    expected = output_and_grads(block)
    torch._dynamo.reset()
    actual = output_and_grads(torch.compile(block, fullgraph=True, backend=backend))
    torch.testing.assert_close(actual, expected, **tolerances)
