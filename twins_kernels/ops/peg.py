"""PEG, timm's ``PosConv``: ``out = x + bias + depthwise_conv3x3(x)`` on tokens (B, N = H*W, C).

The tokens' (B, N, C) layout is NHWC, so the kernels read and write it in place: no transposes.

Backward, with g = grad_out:
  grad_x = g + depthwise_conv3x3(g, weight flipped by 180 degrees): the forward kernel run with
           ``flip_weight`` and no bias, so one kernel serves both directions;
  grad_w[c, i, j] = sum over (b, h, w) of g[b, h, w, c] * x[b, h + i - 1, w + j - 1, c];
  grad_b[c] = sum over (b, h, w) of g[b, h, w, c].
The weight and bias gradients are reductions over B*H*W. Each program reduces a fixed block of rows
into its own slot of an fp32 buffer and one ``sum`` finishes the job: no atomics, so the result is
bitwise reproducible and its partition depends only on the shape, never on the GPU.

Stride > 1 (never used by Twins) and ``in_chans != embed_dim`` run on the PyTorch reference on every
backend; everything else runs on the backend chosen (see ``twins_kernels.backend``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ._triton import TRITON_DTYPES, tl, triton
from .common import (
    accumulation_dtype,
    autocast_neutral,
    call_choice,
    check_int,
    check_param,
    check_tokens,
    cuda_ops,
    empty_output,
    kernel_backward_entry,
    kernel_op_entry,
    launch_device,
    map_size_of,
    next_pow2,
    op_backend,
    pow2_block,
    traced_map_size,
)

NUM_TAPS = 9  # 3 x 3 depthwise kernel
PARTIAL_SLOTS = NUM_TAPS + 1  # the nine weight taps and the bias
WEIGHT_GRAD_PROGRAMS = 512  # row blocks for the weight-gradient reduction: enough to fill any GPU


def peg_output_size(height: int, width: int, stride: int) -> tuple[int, int]:
    return (height - 1) // stride + 1, (width - 1) // stride + 1


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
def peg_reference(x, weight, bias, size, stride: int = 1):
    """timm's PosConv math on (B, N, C) tokens, any stride and channel grouping; the parameters used in
    x's dtype, as the kernels use them (and autocast would give timm's conv)."""
    batch, _, chans = x.shape
    feat = x.transpose(1, 2).reshape(batch, chans, *size)
    bias = None if bias is None else bias.to(x.dtype)
    out = F.conv2d(feat, weight.to(x.dtype), bias, stride, 1, groups=weight.shape[0])
    if stride == 1:
        out += feat  # in place, as timm adds it: no second map-sized allocation
    return out.flatten(2).transpose(1, 2)


def peg_reference_backward(grad_out, x, weight, size, stride: int):
    """Gradients of peg_reference: x's and the parameters', all in x's dtype."""
    batch, _, chans = x.shape
    feat = x.transpose(1, 2).reshape(batch, chans, *size)
    out_size = peg_output_size(*size, stride)
    g = grad_out.transpose(1, 2).reshape(batch, weight.shape[0], *out_size)
    groups = weight.shape[0]
    # the three gradients from one call, as autograd's conv backward takes them
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, feat, weight.to(x.dtype), [groups], [stride, stride], [1, 1], [1, 1], False, [0, 0], groups,
        [True, True, True])
    if stride == 1:
        grad_x = grad_x + g
    return grad_x.flatten(2).transpose(1, 2), grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_shifted_tile(x_ptr, b, hh, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC: tl.constexpr):
    """x[b, hh, ww, c] as an ACC (BLOCK_W, BLOCK_C) tile, zero outside the map (the conv's padding). Offsets
    are 64-bit, the channels' too (a channel-major view's channel stride is its B * N)."""
    inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    tokens = (hh * W + ww).to(tl.int64)
    ptrs = x_ptr + b * stride_xb + tokens[:, None] * stride_xn + c_offs[None, :].to(tl.int64) * stride_xc
    return tl.load(ptrs, mask=inside[:, None] & c_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _tap_grad(g, x_ptr, b, hh, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC: tl.constexpr):
    """sum over the tile's tokens of g * x shifted to (hh, ww): one tap's gradient, per channel."""
    return tl.sum(g * _load_shifted_tile(x_ptr, b, hh, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC), axis=0)


# do_not_specialize: the map's sizes vary with the image (see lsa._MAP_SIZE_ARGS)
@triton.jit(do_not_specialize=["H", "W"])
def peg_conv3x3_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_xc,
    HAS_BIAS: tl.constexpr, FLIP_WEIGHT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, h, w, :] = x[b, h, w, :] + bias + sum_ij w[:, i, j] * x[b, h+i-1, w+j-1, :]; one row
    segment of BLOCK_W tokens by BLOCK_C channels per program. ``w`` is (C, 9) in ACC, the accumulation
    dtype (fp32; fp64 for float64 inputs, which gradcheck uses)."""
    row = tl.program_id(0)
    b = (row // H).to(tl.int64)
    h = row % H
    w_offs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C

    acc = _load_shifted_tile(x_ptr, b, h, w_offs, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c_offs, mask=c_mask, other=0.0)[None, :]
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            if FLIP_WEIGHT:
                tap = (2 - i) * 3 + (2 - j)
            else:
                tap = i * 3 + j
            w_tap = tl.load(w_ptr + c_offs * 9 + tap, mask=c_mask, other=0.0)
            x_tap = _load_shifted_tile(x_ptr, b, h + i - 1, w_offs + j - 1, c_offs, c_mask, H, W,
                                       stride_xb, stride_xn, stride_xc, ACC)
            acc += x_tap * w_tap[None, :]

    tokens = (h * W + w_offs).to(tl.int64)
    out_ptrs = out_ptr + b * H * W * C + tokens[:, None] * C + c_offs[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(w_offs < W)[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=["H", "W", "rows", "rows_per_program"])  # both rows args vary with batch and image
def peg_weight_grad_kernel(
    g_ptr, x_ptr, partial_ptr,
    H, W, C, rows, rows_per_program,
    stride_gb, stride_gn, stride_gc,
    stride_xb, stride_xn, stride_xc,
    ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[p, tap, c]: program p's share of the weight-tap and bias gradients over its rows."""
    program = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    zero = tl.zeros((BLOCK_C,), dtype=ACC)
    acc00, acc01, acc02 = zero, zero, zero
    acc10, acc11, acc12 = zero, zero, zero
    acc20, acc21, acc22 = zero, zero, zero
    acc_bias = zero

    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        b = (row // H).to(tl.int64)
        h = row % H
        for w_start in range(0, W, BLOCK_W):
            ww = w_start + tl.arange(0, BLOCK_W)
            g = _load_shifted_tile(g_ptr, b, h, ww, c_offs, c_mask, H, W, stride_gb, stride_gn, stride_gc, ACC)
            acc_bias += tl.sum(g, axis=0)
            acc00 += _tap_grad(g, x_ptr, b, h - 1, ww - 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc01 += _tap_grad(g, x_ptr, b, h - 1, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc02 += _tap_grad(g, x_ptr, b, h - 1, ww + 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc10 += _tap_grad(g, x_ptr, b, h, ww - 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc11 += _tap_grad(g, x_ptr, b, h, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc12 += _tap_grad(g, x_ptr, b, h, ww + 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc20 += _tap_grad(g, x_ptr, b, h + 1, ww - 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc21 += _tap_grad(g, x_ptr, b, h + 1, ww, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)
            acc22 += _tap_grad(g, x_ptr, b, h + 1, ww + 1, c_offs, c_mask, H, W, stride_xb, stride_xn, stride_xc, ACC)

    out = partial_ptr + program.to(tl.int64) * 10 * C + c_offs
    tl.store(out + 0 * C, acc00, mask=c_mask)
    tl.store(out + 1 * C, acc01, mask=c_mask)
    tl.store(out + 2 * C, acc02, mask=c_mask)
    tl.store(out + 3 * C, acc10, mask=c_mask)
    tl.store(out + 4 * C, acc11, mask=c_mask)
    tl.store(out + 5 * C, acc12, mask=c_mask)
    tl.store(out + 6 * C, acc20, mask=c_mask)
    tl.store(out + 7 * C, acc21, mask=c_mask)
    tl.store(out + 8 * C, acc22, mask=c_mask)
    tl.store(out + 9 * C, acc_bias, mask=c_mask)


@dataclass(frozen=True)
class PegTiles:
    block_w: int  # tokens of a map row per program
    block_c: int  # channels per program
    num_warps: int


def conv_tiles(chans: int, width: int, unit_channel_stride: bool = True) -> PegTiles:
    """The conv (forward and input gradient): up to 128 channels (256 bytes of a token in 16 bits) by
    up to 4096 / that many tokens of a row, so a program's tile is at most 64 x 64 of Twins' C = 64, on
    4 warps (the nine shifted loads of a tile are independent; NOTES 5 has the register count). Half
    that tile where the channels are strided: each element then needs its own 64-bit address, and the
    full tile spilled up to 184 bytes a thread with Triton 3.6 (NOTES 35)."""
    block_c = pow2_block(128, chans)
    elements = 4096 if unit_channel_stride else 2048
    return PegTiles(min(next_pow2(width), max(1, elements // block_c)), block_c, 4)


def weight_grad_tiles(chans: int, width: int, unit_channel_stride: bool = True) -> PegTiles:
    """The weight gradient walks its rows a tile at a time (the gradient's and nine shifted input
    tiles live at once) into ten per-channel accumulators: 32 tokens x up to 64 channels, 4 warps;
    16 tokens where the channels are strided (as for the conv)."""
    return PegTiles(min(next_pow2(width), 32 if unit_channel_stride else 16), pow2_block(64, chans), 4)


def peg_conv3x3_triton(x, weight, bias, height: int, width: int, flip_weight: bool = False):
    """x + bias + depthwise 3x3 conv of x (weight (C, 1, 3, 3)), on (B, N, C) tokens of any strides."""
    batch, tokens, chans = x.shape
    out = empty_output((batch, tokens, chans), x)
    acc = accumulation_dtype(x.dtype)
    w9 = weight.reshape(chans, NUM_TAPS).to(acc).contiguous()
    bias_acc = bias.to(acc).contiguous() if bias is not None else w9
    tiles = conv_tiles(chans, width, x.stride(2) == 1)
    grid = (batch * height, triton.cdiv(width, tiles.block_w), triton.cdiv(chans, tiles.block_c))
    with launch_device(x):
        peg_conv3x3_kernel[grid](
            x, w9, bias_acc, out, height, width, chans, *x.stride(),
            HAS_BIAS=bias is not None, FLIP_WEIGHT=flip_weight, ACC=TRITON_DTYPES[acc],
            BLOCK_W=tiles.block_w, BLOCK_C=tiles.block_c, num_warps=tiles.num_warps,
        )
    return out


def weight_grad_partition(rows: int) -> tuple[int, int]:
    """(rows_per_program, programs) for the deterministic weight-gradient reduction."""
    rows_per_program = max(1, -(-rows // WEIGHT_GRAD_PROGRAMS))
    return rows_per_program, -(-rows // rows_per_program)


def peg_weight_grad_triton(grad_out, x, height: int, width: int):
    batch, _, chans = x.shape
    rows_per_program, programs = weight_grad_partition(batch * height)
    acc = accumulation_dtype(x.dtype)
    partial = empty_output((programs, PARTIAL_SLOTS, chans), x, acc)
    tiles = weight_grad_tiles(chans, width, x.stride(2) == 1 and grad_out.stride(2) == 1)
    grid = (programs, triton.cdiv(chans, tiles.block_c))
    with launch_device(x):
        peg_weight_grad_kernel[grid](
            grad_out, x, partial, height, width, chans, batch * height, rows_per_program,
            *grad_out.stride(), *x.stride(), ACC=TRITON_DTYPES[acc], BLOCK_W=tiles.block_w,
            BLOCK_C=tiles.block_c, num_warps=tiles.num_warps,
        )
    return partial.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# Backend dispatch, torch.library registration, autograd
# ----------------------------------------------------------------------------------------------
def _kernel_backend(x: torch.Tensor, weight: torch.Tensor, stride: int, requested: str) -> str:
    backend = op_backend(x, requested)
    if stride != 1 or weight.shape[1] != 1:
        return "torch"
    return backend


def _split_partial(sums: torch.Tensor, weight: torch.Tensor):
    # Copies, never views of ``sums`` (a custom op's outputs must not alias each other), and contiguous as
    # the fake promises: compiled code asserts the strides (a copy of the transposed taps would keep them).
    grad_w = weight.new_empty(weight.shape)
    grad_w.view(weight.shape[0], NUM_TAPS).copy_(sums[:NUM_TAPS].t())
    return grad_w, sums[NUM_TAPS].to(weight.dtype, copy=True)


@autocast_neutral
def peg_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    height: int, width: int, stride: int, backend: str, map_size: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    height, width = map_size_of("peg_forward", x.shape[1], height, width, map_size)
    kernel = _kernel_backend(x, weight, stride, backend)
    if kernel == "triton":
        return peg_conv3x3_triton(x, weight, bias, height, width)
    if kernel == "cuda":
        return cuda_ops().peg_conv3x3(x, weight, bias, height, width, False)
    return peg_reference(x, weight, bias, (height, width), stride).contiguous()


peg_forward_op = torch.library.custom_op("twins_kernels::peg_forward", peg_forward, mutates_args=())


@peg_forward_op.register_fake
def _(x, weight, bias, height, width, stride, backend, map_size=None):
    out_h, out_w = peg_output_size(height, width, stride)
    return x.new_empty((x.shape[0], out_h * out_w, weight.shape[0]))


@autocast_neutral
def peg_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    height: int, width: int, stride: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = _kernel_backend(x, weight, stride, backend)
    if kernel == "triton":
        grad_x = peg_conv3x3_triton(grad_out, weight, None, height, width, flip_weight=True)
        return (grad_x, *_split_partial(peg_weight_grad_triton(grad_out, x, height, width), weight))
    if kernel == "cuda":
        ops = cuda_ops()
        grad_x = ops.peg_conv3x3(grad_out, weight, None, height, width, True)
        return (grad_x, *_split_partial(ops.peg_weight_grad(grad_out, x, height, width), weight))
    grad_x, grad_w, grad_b = peg_reference_backward(grad_out, x, weight, (height, width), stride)
    return grad_x.contiguous(), grad_w.to(weight.dtype).contiguous(), grad_b.to(weight.dtype)


peg_backward_op = torch.library.custom_op("twins_kernels::peg_backward", peg_backward, mutates_args=())


@peg_backward_op.register_fake
def _(grad_out, x, weight, height, width, stride, backend):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


run_peg_backward = kernel_backward_entry(peg_backward_op, peg_backward, "peg")


def _setup_context(ctx, inputs, output):
    x, weight, bias, height, width, stride, backend, map_size = inputs
    height, width = map_size_of("peg_forward", x.shape[1], height, width, map_size)
    ctx.save_for_backward(x, weight)
    ctx.args = (height, width, stride, call_choice(backend))
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = run_peg_backward(grad_out, x, weight, *ctx.args)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None, None


run_peg_forward = kernel_op_entry(peg_forward_op, peg_forward, _setup_context, _backward)


def peg(x, weight, bias=None, size=None, stride: int = 1, backend: str | None = None):
    """PEG (timm ``PosConv``) on tokens ``x`` (B, N, C) laid out as ``size`` = (H, W).

    ``weight`` is the depthwise conv's (C_out, C / C_out, 3, 3) weight and ``bias`` its (C_out,) bias.
    Returns (B, N', C_out) with N' = H' * W' (H' = H, W' = W at stride 1, where x is added back).
    ``backend``: "auto" | "triton" | "cuda" | "torch", or None for the ambient choice.
    """
    batch, tokens, chans, height, width = check_tokens(x, size)
    check_int(stride, "stride")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[0] == 0:
        raise ValueError(f"weight must be a (C_out, C / C_out, 3, 3) tensor with C_out >= 1, got shape "
                         f"{tuple(weight.shape)}")
    out_chans = weight.shape[0]
    if chans % out_chans != 0:
        raise ValueError(f"x has C={chans} channels, not a multiple of the weight's {out_chans} groups")
    if stride == 1 and out_chans != chans:
        raise ValueError(f"stride 1 adds x back, so C_out ({out_chans}) must equal C ({chans})")
    check_param(weight, "weight", (out_chans, chans // out_chans, 3, 3), x)
    if bias is not None:
        check_param(bias, "bias", (out_chans,), x)
    if backend is not None and not torch.compiler.is_compiling():
        resolve_backend(backend, x.device)  # fail here, naming what is missing, not deep inside the op
    return run_peg_forward(x, weight, bias, height, width, stride, call_choice(backend), traced_map_size(size))
