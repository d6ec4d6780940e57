"""The parity harness itself fails the faults it exists to catch: an element a kernel never writes, a
NaN, a parameter left without a gradient (every parity test relies on it)."""
import math

import pytest
import torch
from timm.models.twins import PosConv
from torch import nn

from twins_kernels.ops.common import empty_output
from twins_kernels.testing import module_parity_errors

from parity import check_module_parity, check_op_against_reference, make_tokens


class LastElementUnwritten(torch.autograd.Function):
    """``x * 2`` into kernel-style outputs (``empty_output``) that leave the last element unwritten: the
    output's in the forward when ``in_forward``, the input gradient's in the backward otherwise."""

    @staticmethod
    def forward(ctx, x, in_forward: bool):
        ctx.in_forward = in_forward
        return _doubled_but_last(x) if in_forward else x * 2

    @staticmethod
    def backward(ctx, grad):
        return (grad * 2 if ctx.in_forward else _doubled_but_last(grad)), None


def _doubled_but_last(t: torch.Tensor) -> torch.Tensor:
    out = empty_output(t.shape, t)
    out.view(-1)[:-1] = t.reshape(-1)[:-1] * 2
    return out


@pytest.mark.parametrize("in_forward,message", [(True, "output"), (False, "gradient of input 0")])
def test_an_unwritten_element_fails_the_op_check(in_forward, message):
    x = torch.randn(2, 30, 16)
    with pytest.raises(AssertionError, match=message):
        check_op_against_reference(lambda x: LastElementUnwritten.apply(x, in_forward), lambda x: x * 2, [x],
                                   torch.float16)
    # the harness compares what it should: the op written in full passes
    check_op_against_reference(lambda x: x * 2, lambda x: x * 2, [x], torch.float16)


class Doubling(nn.Module):
    """forward(x, size) as the Twins modules take it: x times a parameter of 2s, through ``fault``."""

    def __init__(self, fault=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((16,), 2.0))
        self.fault = fault

    def forward(self, x, size):
        if self.fault == "no weight gradient":
            return x * self.weight.detach()
        if self.fault == "nan":
            return (x * self.weight).index_fill(1, torch.tensor([3]), float("nan"))
        return x * self.weight


@pytest.mark.parametrize("fault,failing", [("no weight gradient", "grad_weight"), ("nan", "out")])
def test_module_parity_errors_are_infinite_for_each_fault(fault, failing):
    x = torch.randn(2, 30, 16)

    def make_faulty(module):
        module.fault = fault
        return module

    errors = module_parity_errors(Doubling(), make_faulty, x, (5, 6), torch.float32)
    assert errors[failing] == math.inf, errors
    intact = module_parity_errors(Doubling(), lambda module: module, x, (5, 6), torch.float32)
    assert all(error <= 1e-6 for error in intact.values()), intact


def test_an_unwritten_module_output_fails_the_module_check():
    """A module that leaves its output as allocated fails, because outputs are poisoned with NaN: every
    element, not only where fresh memory happens to hold garbage (a kernel that skips elements whose value
    is 0 would pass on zeroed pages)."""
    allocated = []

    class Unwritten(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.proj = inner.proj

        def forward(self, x, size):
            out = empty_output(x.shape, x)
            allocated.append(out.clone())
            return out + 0 * self.proj[0].weight.sum() + 0 * self.proj[0].bias.sum() + 0 * x

    x = make_tokens(1, 3, 3, 8, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="out"):
        check_module_parity(PosConv(8, 8), Unwritten, x, (3, 3), torch.float32)
    assert allocated and all(out.isnan().all() for out in allocated)
