"""Parity checking, shared by the test suite and the main job (``python -m twins_kernels``).

A check builds the reference module in float64 and the module under test in the dtype being
tested, with equal parameters; feeds both the same fresh random input and output gradient; runs
forward and backward; and compares output, input gradient and every parameter gradient by relative
error ``||a - b|| / ||b||``. The module under test runs inside ``poisoned_outputs()``, so an element a
kernel never writes is NaN, and NaN never passes (its error is inf).

Parameters, input and output gradient are rounded to the test dtype first and the reference takes
those rounded values, so both sides see identical numbers: what is measured is the error of the
computation in that dtype, not of storing the test's data in it (at bf16, rounding the parameters
alone moved a GSA bias gradient by 4e-3 of the 1e-2 tolerance).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch

from .ops.common import poisoned_outputs

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in IEEE fp32 inside the block: PyTorch runs fp32 cuDNN
    convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``), which puts a stride-4 patch
    conv about 3e-4 off, 30 times the fp32 tolerance. A fused module's parts that run PyTorch ops (every
    model's patch embedding, the cuda backend's GSA sub-sampling conv) follow these settings, as timm
    does, so an fp32 parity check turns TF32 off for its run; the kernels' own fp32 dots are IEEE always.
    It sets the ``allow_tf32`` flags, not the newer ``fp32_precision`` ones: setting those for cuDNN's
    convolutions alone makes every later read of ``allow_tf32`` raise (torch 2.11 and 2.14)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    previous = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = previous


def model_error_allowed(dtype: torch.dtype, timm_error: float) -> float:
    """How far a whole patched model may be from a higher-precision reference, given how far the
    unpatched timm model in the same dtype is. A model's error is many ops' rounding added up: in
    fp32/fp64 ten op tolerances; in fp16/bf16 the op tolerance or twice timm's own error, whichever is
    larger (timm in bf16 is itself about 1e-2 off on the logits and several times that on some
    parameter gradients, so a flat 1e-2 would fail timm itself)."""
    if dtype in (torch.float32, torch.float64):
        return 10 * TOLERANCE[dtype]
    return max(TOLERANCE[dtype], 2 * timm_error)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if anything is NaN/Inf or shapes differ."""
    if actual.shape != expected.shape:
        return math.inf
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return math.inf
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def make_tokens(batch: int, height: int, width: int, chans: int, dtype, device, *, contiguous: bool = True,
                scale: float = 1.0) -> torch.Tensor:
    """Fresh random (B, H*W, C) tokens; with contiguous=False a strided view of a larger buffer."""
    if contiguous:
        return torch.randn(batch, height * width, chans, device=device).mul_(scale).to(dtype)
    # channels every other element of a wider buffer, tokens in transposed order: a real
    # non-contiguous view, like the ones slicing or transposing hands a module
    wide = torch.randn(batch, chans * 2, height * width, device=device).mul_(scale).to(dtype)
    return wide.transpose(1, 2)[:, :, ::2]


@ieee_fp32()
def module_parity_errors(
    reference_module: torch.nn.Module,
    make_fused: Callable[[torch.nn.Module], torch.nn.Module],
    x: torch.Tensor,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> dict[str, float]:
    """Relative errors of ``make_fused(copy of reference_module in dtype)`` against
    ``reference_module`` in float64: keys ``out``, ``grad_x`` and ``grad_<parameter name>``."""
    device = x.device
    tested = copy.deepcopy(reference_module).to(device=device, dtype=dtype)
    reference = copy.deepcopy(tested).to(dtype=torch.float64)
    fused = make_fused(tested)

    x_ref = x.detach().double().contiguous().requires_grad_()
    out_ref = reference(x_ref, size)
    grad_out = torch.randn_like(out_ref).to(dtype).double()
    out_ref.backward(grad_out)

    x_test = x.detach().clone() if x.is_contiguous() else x.detach()
    x_test.requires_grad_()
    with poisoned_outputs():
        out = fused(x_test, size)
        out.backward(grad_out.to(dtype))

    errors = {"out": rel_err(out, out_ref), "grad_x": rel_err(x_test.grad, x_ref.grad)}
    ref_params = dict(reference.named_parameters())
    fused_params = dict(fused.named_parameters())
    if set(fused_params) != set(ref_params):
        raise AssertionError(f"parameters differ: fused {sorted(fused_params)} vs reference {sorted(ref_params)}")
    for name, param in fused_params.items():
        errors[f"grad_{name}"] = math.inf if param.grad is None else rel_err(param.grad, ref_params[name].grad)
    return errors
