"""LSA, timm's ``LocallyGroupedAttn``: self-attention inside non-overlapping ws x ws windows.

    qkv = Linear(x)                         (B, N = H*W, 3C): channel s*C + h*D + d for s in (q, k, v)
    out = per window and head, softmax(q k^T * scale) v over the window's ws*ws keys    (B, N, C)

timm zero-pads the map on the right and bottom to multiples of ws *before* the qkv Linear, so a padded
position's q, k and v are the qkv bias; padded keys take part in every window's softmax and outputs at
padded positions are cropped ("zero" padding). mmsegmentation's variant ("mask" padding) adds -1000 to
the logits where query and key validity differ; for the valid queries, the only ones not cropped, that is
excluding the padded keys, which is how it is computed here (exp(-1000) is 0 even in float64). Its mask
is sliced with ``-pad_b:`` and ``-pad_r:``, which cover the whole map where that pad is 0, and then
excludes nothing: "mmseg" padding is that code as it runs, "mask" where both sides are padded, else
"zero" (``masks_padding``, decided in the op on the map it runs on).

The qkv Linear stays a cuBLAS GEMM on the N real tokens (nn.Linear); this module is the attention core
between it and ``proj``. The Triton kernels read q, k and v for a window and head straight from the
(B, N, 3C) tensor (any strides) by index arithmetic: window slot i of window (wy, wx) is the token at
(wy*ws + i // ws, wx*ws + i % ws); a key slot past the map's edge holds the qkv bias (zero padding) or is
left out (mask padding); a query slot past it is never stored. No pad, window reshape, permute or crop
is materialized, and out is written to (B, N, C) in token order, ready for ``proj``.

Forward: one program per (batch, window, head) and block of query slots; the ws*ws window slots are
padded to a power-of-two tile (49 -> 64) and the keys go through an online softmax in blocks, so a
window of 16 x 16 = 256 slots never holds a 256 x 256 score tile. It saves the log-sum-exp per
(batch, head, query): O(N * heads), never the ws^4 scores. Accumulation is fp32 (fp64 for float64
inputs, which gradcheck uses); fp32 dots use ``input_precision="ieee"`` (no tf32).

Backward recomputes the probabilities from the log-sum-exp, with delta = rowsum(P * dO V^T) / rowsum(P)
(the value of rowsum(dO * O) without O's rounding, which the cancelling dP - delta amplifies; O is not
read):
  dV = P^T dO,  dS = P * (dO V^T - delta),  dQ = scale * dS K,  dK = scale * dS^T Q,
written straight into a (B, N, 3C) gradient (each real token's q, k and v slice has exactly one writer:
no zero fill, no atomics). One program per (batch, window, head) and block of key slots loops over the
window's query blocks for dK, dV; when the window is one key block (ws <= 8 in 16 bits; in fp32
ws <= 5, or 4 above head_dim 64: ``lsa_tiles``) the same program also writes dQ and computes delta,
otherwise a second kernel, launched first, one program per query block, computes delta (a first pass
over the key blocks) and dQ (a second), and writes delta for the dK, dV kernel. Zero
padding: the padded keys are copies of the bias, so their dK, dV are the bias's share of the gradient;
each program writes its padded keys' sums to its own slot of a buffer that one ``sum`` reduces (no
float atomics: bitwise reproducible). Padded queries are cropped, so the q part of that share is zero.

Backends (see ``twins_kernels.backend``):
  triton  the kernels above (float32, float16, bfloat16; float64 for checks).
  cuda    ``torch.ops.twins_kernels_cuda.lsa_forward/lsa_backward`` (float32, float16, bfloat16;
          float64 runs the PyTorch reference).
  torch   the PyTorch reference (windows materialized), fp32 accumulation: on CPU the windows attend
          through PyTorch's fused CPU attention (it returns the log-sum-exp too), elsewhere plain math.
  The kernel backends need head_dim = C / num_heads in 16..128: with ``auto`` a head_dim outside it
  runs the reference; naming triton or cuda raises. Likewise ws: 2..16 on the kernel backends, any
  ws >= 2 on the reference (ws = 1 is global attention: GSA).

The CUDA extension's contract (csrc/twins_kernels.h), the same as the Triton launchers':
  lsa_forward(Tensor qkv, Tensor qkv_bias, int height, int width, int ws, int num_heads, float scale,
              bool mask_padding) -> (Tensor out, Tensor lse)
      qkv       (B, N, 3C), N = height * width, fp32 / fp16 / bf16, any strides; the qkv Linear's
                output on the real tokens, channel s*C + h*D + d for s in (q, k, v), D = C / num_heads
                in 16..128.
      qkv_bias  (3C,), any floating dtype (used in qkv's dtype): what a padded position holds.
      ws        2..16; windows of ws x ws tokens, the map padded right/bottom to multiples of ws.
      scale     the logits' scale (timm: D ** -0.5).
      mask_padding  false: timm's zero padding (padded keys hold the bias); true: padded keys excluded.
      out       (B, N, C) contiguous, qkv's dtype, head h in channels h*D:(h+1)*D, token order.
      lse       (B, num_heads, N) contiguous float32: log sum_j exp(scale * q_i . k_j) over the keys
                query i attends to.
  lsa_backward(Tensor grad_out, Tensor qkv, Tensor qkv_bias, Tensor out, Tensor lse, int height,
               int width, int ws, int num_heads, float scale, bool mask_padding)
               -> (Tensor grad_qkv, Tensor grad_bias)
      grad_out  (B, N, C) any strides; qkv ... mask_padding as given to the forward; out, lse its outputs.
      grad_qkv  (B, N, 3C) contiguous, qkv's dtype: the gradient of qkv at the real tokens.
      grad_bias (3C,) float32: the padded keys' share of the qkv bias gradient, deterministic; zeros in
                the q third, and everywhere when mask_padding or when ws divides both H and W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import TRITON_DTYPES, scalar_value, softmax_delta, tl, triton
from .common import (
    accumulation_dtype,
    attention_backend,
    autocast_neutral,
    call_choice,
    check_float,
    check_int,
    check_param,
    check_tokens,
    cuda_ops,
    dot_precision,
    empty_output,
    fma_rows,
    fma_warps,
    fused_cpu_attention,
    kernel_backward_entry,
    kernel_op_entry,
    launch_device,
    map_size_of,
    next_pow2,
    reference_outside_kernels,
    scalar_arg,
    scores_grad,
    traced_map_size,
)

MIN_WS, MAX_WS = 2, 16  # 16 x 16 = 256 window slots bounds the tiles; ws = 1 is global attention (GSA)
PAD_MODES = ("zero", "mask", "mmseg")


def check_pad_mode(pad_mode: str) -> str:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    return pad_mode


def masks_padding(pad_mode: str, height: int, width: int, ws: int) -> bool:
    """Whether the padded keys are left out of the softmax: never in "zero" (timm), always in "mask", and in
    "mmseg" (mmsegmentation's code as it runs) only where the map is padded at the bottom and the right:
    its mask, sliced with ``-pad_b:`` and ``-pad_r:``, covers the whole map where either pad is 0 and
    then excludes nothing, so that the padded tokens take part as zero padding's do."""
    if pad_mode == "mmseg":
        return height % ws != 0 and width % ws != 0
    return pad_mode == "mask"


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
def _window_counts(height: int, width: int, ws: int) -> tuple[int, int]:
    """(rows of windows, windows per row) of an H x W map cut into ws x ws windows, the last ones padded."""
    return -(-height // ws), -(-width // ws)


def _axis_blocks(size: int, ws: int):
    """One axis of the map cut where its windows cut it: (positions, windows, slots in a window, their
    shape) of the whole windows, then of the last window's real part when ws does not divide ``size``."""
    whole = size // ws
    blocks = [(slice(0, whole * ws), slice(0, whole), slice(None), (whole, ws))] if whole else []
    if size % ws:
        blocks.append((slice(whole * ws, size), slice(whole, whole + 1), slice(0, size % ws), (1, size % ws)))
    return blocks


def _map_blocks(tokens_map: torch.Tensor, windows_map: torch.Tensor, height: int, width: int, ws: int):
    """Pairs of views of the same real positions, at most four: a block of ``tokens_map`` (B, H, W, ...)
    and the block of ``windows_map`` (B, Hp/ws, ws, Wp/ws, ws, ...), the windows in map order."""
    for rows, row_windows, row_slots, row_shape in _axis_blocks(height, ws):
        for cols, col_windows, col_slots, col_shape in _axis_blocks(width, ws):
            block = tokens_map[:, rows, cols].unflatten(2, col_shape).unflatten(1, row_shape)
            yield block, windows_map[:, row_windows, row_slots, col_windows, col_slots]


def _window_heads_of(t: torch.Tensor, height: int, width: int, ws: int, num_heads: int,
                     fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens (B, H*W, heads*K) as window heads (B, windows, heads, ws*ws, K) of the map padded right and
    bottom to multiples of ws, copied once; the padded slots hold ``fill`` (heads*K,), or zero when it is
    None. Windows row-major, slots row-major inside a window (timm's order)."""
    batch, _, chans = t.shape
    rows, cols = _window_counts(height, width, ws)
    windows = t.new_empty((batch, rows, cols, ws, ws, chans))
    windows_map = windows.transpose(2, 3)
    for block, window_block in _map_blocks(t.unflatten(1, (height, width)), windows_map, height, width, ws):
        window_block.copy_(block)
    pad = t.new_zeros(()) if fill is None else fill.to(t.dtype)
    if height % ws:
        windows_map[:, -1, height % ws:] = pad
    if width % ws:
        windows_map[:, :, :, -1, width % ws:] = pad
    return windows.view(batch, rows * cols, ws * ws, num_heads, chans // num_heads).transpose(2, 3)


def _window_heads_to_tokens(parts, height: int, width: int, ws: int, dtype: torch.dtype) -> torch.Tensor:
    """Window heads (B, windows, heads, ws*ws, K) as tokens (B, H*W, parts * heads*K) in ``dtype``, the
    parts side by side along the channels, each copied straight into place; padded slots are dropped."""
    batch, _, heads, _, head_dim = parts[0].shape
    rows, cols = _window_counts(height, width, ws)
    tokens = parts[0].new_empty((batch, height * width, len(parts), heads, head_dim), dtype=dtype)
    for index, part in enumerate(parts):
        windows_map = part.reshape(batch, rows, cols, heads, ws, ws, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        part_tokens = tokens[:, :, index].unflatten(1, (height, width))
        for block, window_block in _map_blocks(part_tokens, windows_map, height, width, ws):
            block.copy_(window_block)
    return tokens.flatten(2)


def _window_heads(qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int):
    """q, k, v (B, windows, heads, ws*ws, D) of the zero-padded map, as timm lays them out."""
    heads = _window_heads_of(qkv, height, width, ws, 3 * num_heads, qkv_bias)
    return heads.unflatten(2, (3, num_heads)).unbind(2)


def _key_inside(height: int, width: int, ws: int, device) -> torch.Tensor:
    """(windows, ws*ws) bool: which window slots are real positions (the keys mask padding keeps)."""
    inside = torch.ones((1, height * width, 1), dtype=torch.bool, device=device)
    return _window_heads_of(inside, height, width, ws, 1)[0, :, 0, :, 0]


def lsa_reference(qkv, qkv_bias, size, num_heads: int, ws: int, scale: float | None = None,
                  pad_mode: str = "zero", dropout_p: float = 0.0):
    """The LSA attention core in plain PyTorch, as timm writes it: pad, window, attend (SDPA, with attention
    dropout), un-window, crop. ``qkv`` (B, H*W, 3C) is the qkv Linear's output on the real tokens and
    ``qkv_bias`` (3C,) what it makes of a padded (zero) token; returns (B, H*W, C). Any head_dim, any
    ws >= 1. No Python branch depends on the map size, so torch.jit.trace, which hands timm's H and W
    over as 0-d tensors, records it for every size (the dropout path of a traced FusedLSA)."""
    height, width = size
    batch, _, channels = qkv.shape
    head_dim = channels // (3 * num_heads)
    rows, cols = _window_counts(height, width, ws)
    padding = (0, 0, 0, cols * ws - width, 0, rows * ws - height)
    inside = F.pad(qkv.new_ones((1, height, width, 1), dtype=torch.bool), padding)  # real positions
    qkv_map = torch.where(inside, F.pad(qkv.reshape(batch, height, width, channels), padding),
                          qkv_bias.to(qkv.dtype))
    # (3, B, windows, heads, ws*ws, D): windows and the slots inside them row-major (timm's order)
    q, k, v = (qkv_map.reshape(batch, rows, ws, cols, ws, 3, num_heads, head_dim)
               .permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch, rows * cols, num_heads, ws * ws, head_dim))
    attn_mask = None
    if pad_mode in ("mask", "mmseg"):  # (windows, 1, 1, keys): the keys that take part
        key_inside = inside
        if pad_mode == "mmseg":  # masks_padding's rule without a branch: the last row's first position is
            # real where the bottom is not padded, the last column's first where the right is not
            key_inside = inside | inside[:, -1:, :1] | inside[:, :1, -1:]
        attn_mask = key_inside.reshape(rows, ws, cols, ws).transpose(1, 2).reshape(rows * cols, 1, 1, ws * ws)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    out_map = out.reshape(batch, rows, cols, num_heads, ws, ws, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
    # cropped by a negative padding: a new tensor whether or not the crop keeps every position, which a
    # compiled graph would otherwise guard on (a view then, a copy else)
    cropped = F.pad(out_map.reshape(batch, rows * ws, cols * ws, channels // 3), [-pad for pad in padding])
    return cropped.view(batch, height * width, channels // 3)


def _scores(q, k, scale: float, key_inside: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) * scale
    if key_inside is not None:
        scores = scores.masked_fill(~key_inside[:, None, None, :], float("-inf"))
    return scores


def _reference_forward(qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int, scale: float,
                       mask_padding: bool):
    """(out (B, N, C), lse (B, heads, N)) of the torch backend, out cast back to qkv's dtype like the kernels'.
    On CPU, PyTorch's fused attention kernel (fp32 accumulation, the log-sum-exp too) on the windows, so a
    patched model runs as fast as timm on CPU; elsewhere (the torch backend asked for on a GPU) the math."""
    if fused_cpu_attention(qkv):
        q, k, v, attn_mask = _cpu_window_inputs(qkv, qkv_bias, height, width, ws, num_heads, mask_padding)
        out, lse = _cpu_window_attention(q, k, v, scale, attn_mask)
    else:
        out, lse = _window_attention_math(qkv, qkv_bias, height, width, ws, num_heads, scale, mask_padding)
    lse_tokens = _window_heads_to_tokens([lse[..., None]], height, width, ws, lse.dtype)
    return _window_heads_to_tokens([out], height, width, ws, qkv.dtype), lse_tokens.transpose(1, 2).contiguous()


def _reference_backward(grad_out, qkv, qkv_bias, out, lse, height: int, width: int, ws: int, num_heads: int,
                        scale: float, mask_padding: bool):
    """(grad_qkv (B, N, 3C), the padded positions' share of the qkv bias gradient (3C,)) from the forward's
    out and lse. The padded query slots, which the forward cropped, take out = 0 and lse = +inf: their
    probabilities are zero, as is their output gradient, so they add nothing to dK and dV."""
    acc = accumulation_dtype(qkv.dtype)
    fused = fused_cpu_attention(qkv)
    dtype = qkv.dtype if fused else acc
    grad = _window_heads_of(grad_out.to(dtype), height, width, ws, num_heads)
    lse = _window_heads_of(lse.transpose(1, 2), height, width, ws, num_heads,
                           lse.new_full((num_heads,), float("inf")))[..., 0]
    if fused:
        out = _window_heads_of(out.to(dtype), height, width, ws, num_heads)
        q, k, v, attn_mask = _cpu_window_inputs(qkv, qkv_bias, height, width, ws, num_heads, mask_padding)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(_flat_windows(t) for t in (grad, q, k, v, out, lse)), 0.0, False, attn_mask=attn_mask, scale=scale)
        grads = [g.reshape(q.shape) for g in grads]
    else:
        grads = _window_attention_math_backward(grad, lse, qkv, qkv_bias, height, width, ws, num_heads, scale,
                                                mask_padding)
    padded = ~_key_inside(height, width, ws, qkv.device)
    grad_bias = torch.cat([g.transpose(2, 3)[:, padded].to(acc).sum(dim=(0, 1)).flatten() for g in grads])
    return _window_heads_to_tokens(grads, height, width, ws, qkv.dtype), grad_bias


def _flat_windows(t: torch.Tensor) -> torch.Tensor:
    """(B, windows, ...) -> (B * windows, ...): the windows as the batch of an attention call."""
    return t.reshape(-1, *t.shape[2:])


def _cpu_window_inputs(qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int, mask_padding: bool):
    """q, k, v window heads in qkv's dtype and, in mask mode, the (B * windows, 1, 1, ws*ws) additive
    mask (-inf on the padded keys) that the fused CPU attention takes."""
    q, k, v = _window_heads(qkv, qkv_bias.to(qkv.dtype), height, width, ws, num_heads)
    if not mask_padding:
        return q, k, v, None
    key_inside = _key_inside(height, width, ws, qkv.device)
    mask = torch.zeros(key_inside.shape, dtype=qkv.dtype, device=qkv.device).masked_fill(~key_inside, float("-inf"))
    return q, k, v, mask.expand(q.shape[0], *mask.shape).reshape(-1, 1, 1, mask.shape[-1])


def _cpu_window_attention(q, k, v, scale: float, attn_mask: torch.Tensor | None):
    """(out (B, windows, heads, ws*ws, D), lse (B, windows, heads, ws*ws)) of window heads q, k, v from
    PyTorch's fused CPU attention, every window slot a query."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(_flat_windows(t) for t in (q, k, v)), 0.0, False, attn_mask=attn_mask, scale=scale)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def _window_attention_math(qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int, scale: float,
                           mask_padding: bool):
    """_cpu_window_attention's (out, lse) in plain tensor math, in the accumulation dtype."""
    acc = accumulation_dtype(qkv.dtype)
    q, k, v = _window_heads(qkv.to(acc), qkv_bias.to(qkv.dtype).to(acc), height, width, ws, num_heads)
    key_inside = _key_inside(height, width, ws, qkv.device) if mask_padding else None
    scores = _scores(q, k, scale, key_inside)
    lse = scores.logsumexp(-1)  # (B, windows, heads, slots)
    return torch.exp(scores - lse[..., None]) @ v, lse


def _window_attention_math_backward(grad, lse, qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int,
                                    scale: float, mask_padding: bool):
    """(grad_q, grad_k, grad_v) (B, windows, heads, ws*ws, D) from the output gradient and the lse in
    window heads: the fused CPU attention's backward in plain tensor math, in the accumulation dtype, but
    for delta, taken from the whole window's probabilities (``scores_grad``)."""
    acc = accumulation_dtype(qkv.dtype)
    q, k, v = _window_heads(qkv.to(acc), qkv_bias.to(qkv.dtype).to(acc), height, width, ws, num_heads)
    key_inside = _key_inside(height, width, ws, qkv.device) if mask_padding else None
    probs = torch.exp(_scores(q, k, scale, key_inside) - lse[..., None])
    grad_v = probs.transpose(-1, -2) @ grad
    grad_scores = scores_grad(probs, grad @ v.transpose(-1, -2))
    return grad_scores @ k * scale, grad_scores.transpose(-1, -2) @ q * scale, grad_v


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _window_slots(slots, y0, x0, H, W, WS: tl.constexpr):
    """Token index, in-window flag and inside-the-map flag of the window slots ``slots`` (row-major
    inside the window whose top-left position is (y0, x0))."""
    y = y0 + slots // WS
    x = x0 + slots % WS
    in_window = slots < WS * WS
    inside = in_window & (y < H) & (x < W)
    return (y * W + x).to(tl.int64), in_window, inside


@triton.jit
def _key_slots(slots, y0, x0, H, W, WS: tl.constexpr, PAD_WITH_BIAS: tl.constexpr):
    """(tokens, inside, valid) of key slots: valid = the key takes part in the softmax. Slot 0 is
    always inside the map (windows start inside it), so every query has a valid key in the first block."""
    tokens, in_window, inside = _window_slots(slots, y0, x0, H, W, WS)
    if PAD_WITH_BIAS:
        valid = in_window
    else:
        valid = inside
    return tokens, inside, valid


@triton.jit
def _load_rows(base_ptr, tokens, rows_mask, chans, d_mask, stride_n, stride_c):
    """(slots, BLOCK_D) tile of base_ptr[token, chans]; zero where rows_mask is false. The channel offsets are
    64-bit: a channel-major view's channel stride is its B * N, and chans * stride_c passes 2^31 with it."""
    return tl.load(base_ptr + tokens[:, None] * stride_n + chans[None, :].to(tl.int64) * stride_c,
                   mask=rows_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _load_keys(qkv_b, bias_ptr, tokens, inside, valid, chans, d_mask, stride_n, stride_c,
               PAD_WITH_BIAS: tl.constexpr):
    """k (or v) rows of key slots: qkv inside the map; past its edge, the bias (zero padding: the qkv
    Linear of a zero token) or zero (masked keys, and tile slots beyond the window)."""
    rows = _load_rows(qkv_b, tokens, inside, chans, d_mask, stride_n, stride_c)
    if PAD_WITH_BIAS:
        bias = tl.load(bias_ptr + chans, mask=d_mask, other=0.0).to(rows.dtype)
        rows = tl.where((valid & ~inside)[:, None], bias[None, :], rows)
    return rows


@triton.jit
def _key_block(qkv_b, bias_ptr, k_slots, y0, x0, H, W, C, q_chans, d_mask, stride_n, stride_c,
               WS: tl.constexpr, PAD_WITH_BIAS: tl.constexpr):
    """tokens, inside, valid, k and v of a block of key slots."""
    tokens, inside, valid = _key_slots(k_slots, y0, x0, H, W, WS, PAD_WITH_BIAS)
    k = _load_keys(qkv_b, bias_ptr, tokens, inside, valid, C + q_chans, d_mask, stride_n, stride_c, PAD_WITH_BIAS)
    v = _load_keys(qkv_b, bias_ptr, tokens, inside, valid, 2 * C + q_chans, d_mask, stride_n, stride_c,
                   PAD_WITH_BIAS)
    return tokens, inside, valid, k, v


@triton.jit
def _program_window(HEADS, WINDOWS, WINDOWS_W, WS: tl.constexpr):
    """(b, head, y0, x0) of program_id(0) = (b * WINDOWS + window) * HEADS + head: the heads of one
    window are neighbouring programs, so they share its cache lines in L2."""
    pid = tl.program_id(0)
    h = pid % HEADS
    window = (pid // HEADS) % WINDOWS
    b = (pid // (HEADS * WINDOWS)).to(tl.int64)
    return b, h, (window // WINDOWS_W) * WS, (window % WINDOWS_W) * WS


@triton.jit
def _query_block(qkv_b, grad_out_b, lse_bh, slots, y0, x0, q_chans, d_mask, H, W,
                 stride_n, stride_c, stride_gn, stride_gc, WS: tl.constexpr):
    """What the backward needs of a block of query slots: tokens, inside, q, dO and lse; zeros for
    slots outside the map (cropped queries)."""
    tokens, _, inside = _window_slots(slots, y0, x0, H, W, WS)
    q = _load_rows(qkv_b, tokens, inside, q_chans, d_mask, stride_n, stride_c)
    grad = _load_rows(grad_out_b, tokens, inside, q_chans, d_mask, stride_gn, stride_gc).to(q.dtype)
    lse = tl.load(lse_bh + tokens, mask=inside, other=0.0)
    return tokens, inside, q, grad, lse


@triton.jit
def _probs_and_grad_probs(q, k, v, grad, lse, q_inside, k_valid, scale,
                          ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P (recomputed from the log-sum-exp) and dP = dO V^T of a query block x key block, in ACC; P is
    zero for cropped queries and excluded keys."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
    probs = tl.where(q_inside[:, None] & k_valid[None, :], tl.exp(scores - lse[:, None]), 0.0)
    grad_probs = tl.dot(grad, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC)
    return probs, grad_probs


# Triton specializes an int argument on its value (== 1, divisible by 16) and compiles once per case:
# the map's sizes vary from image to image (detection, segmentation) and nothing vectorizes on them
# (the strides and C do that), so they are not specialized, and a new image size compiles nothing
# where C is a multiple of 16 (else the batch stride, H * W * 3C, changes its divisibility with the map).
_MAP_SIZE_ARGS = ["H", "W", "WINDOWS", "WINDOWS_W"]


@triton.jit(do_not_specialize=_MAP_SIZE_ARGS)
def lsa_forward_kernel(
    qkv_ptr, bias_ptr, out_ptr, lse_ptr, scale_arg,
    H, W, C, HEADS, HEAD_DIM, WINDOWS, WINDOWS_W,
    stride_b, stride_n, stride_c,
    WS: tl.constexpr, SLOTS: tl.constexpr, PAD_WITH_BIAS: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out and lse of BLOCK_Q query slots (block program_id(1)) of one window and head, online softmax
    over the window's SLOTS key slots in blocks of BLOCK_K."""
    b, h, y0, x0 = _program_window(HEADS, WINDOWS, WINDOWS_W, WS)
    tokens_per_image = H * W
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_chans = h * HEAD_DIM + offs_d
    qkv_b = qkv_ptr + b * stride_b
    scale = scalar_value(scale_arg, ACC)

    q_slots = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_tokens, _, q_inside = _window_slots(q_slots, y0, x0, H, W, WS)
    q = _load_rows(qkv_b, q_tokens, q_inside, q_chans, d_mask, stride_n, stride_c)

    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=ACC)
    row_sum = tl.zeros((BLOCK_Q,), dtype=ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for k_start in range(0, SLOTS, BLOCK_K):
        k_slots = k_start + tl.arange(0, BLOCK_K)
        _, _, k_valid, k, v = _key_block(qkv_b, bias_ptr, k_slots, y0, x0, H, W, C, q_chans, d_mask,
                                         stride_n, stride_c, WS, PAD_WITH_BIAS)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        scores = tl.where(k_valid[None, :], scores, float("-inf"))
        # the first block holds slot 0, a valid key: new_max is finite from the first iteration on
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=ACC)
        row_max = new_max

    out_rows = (b * tokens_per_image + q_tokens) * C
    tl.store(out_ptr + out_rows[:, None] + q_chans[None, :], (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty),
             mask=q_inside[:, None] & d_mask[None, :])
    tl.store(lse_ptr + (b * HEADS + h) * tokens_per_image + q_tokens, row_max + tl.log(row_sum), mask=q_inside)


@triton.jit(do_not_specialize=_MAP_SIZE_ARGS)
def lsa_backward_kernel(
    qkv_ptr, bias_ptr, lse_ptr, delta_ptr, grad_out_ptr, grad_qkv_ptr, pad_grad_ptr, scale_arg,
    H, W, C, HEADS, HEAD_DIM, WINDOWS, WINDOWS_W,
    stride_b, stride_n, stride_c,
    stride_gb, stride_gn, stride_gc,
    WS: tl.constexpr, SLOTS: tl.constexpr, PAD_WITH_BIAS: tl.constexpr, HAS_PADDED_KEYS: tl.constexpr,
    WITH_DQ: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of BLOCK_K key slots (block program_id(1)) of one window and head, over all its query
    blocks; with WITH_DQ (the window is this one key block) also dQ of every query block, and delta from
    its probabilities, else delta from delta_ptr (lsa_backward_dq_kernel, launched before, writes it).
    With HAS_PADDED_KEYS, the padded keys' dK, dV sums go to this program's slot of pad_grad_ptr."""
    b, h, y0, x0 = _program_window(HEADS, WINDOWS, WINDOWS_W, WS)
    tokens_per_image = H * W
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_chans = h * HEAD_DIM + offs_d
    qkv_b = qkv_ptr + b * stride_b
    grad_out_b = grad_out_ptr + b * stride_gb
    grad_qkv_b = grad_qkv_ptr + b * tokens_per_image * 3 * C
    lse_offset = (b * HEADS + h) * tokens_per_image
    scale = scalar_value(scale_arg, ACC)

    key_block = tl.program_id(1)
    k_slots = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_tokens, k_inside, k_valid, k, v = _key_block(qkv_b, bias_ptr, k_slots, y0, x0, H, W, C, q_chans, d_mask,
                                                   stride_n, stride_c, WS, PAD_WITH_BIAS)

    grad_k = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    grad_v = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    for q_start in range(0, SLOTS, BLOCK_Q):
        q_slots = q_start + tl.arange(0, BLOCK_Q)
        q_tokens, q_inside, q, grad, lse = _query_block(
            qkv_b, grad_out_b, lse_ptr + lse_offset, q_slots, y0, x0, q_chans, d_mask, H, W,
            stride_n, stride_c, stride_gn, stride_gc, WS)
        probs, grad_probs = _probs_and_grad_probs(q, k, v, grad, lse, q_inside, k_valid, scale, ACC, DOT_PRECISION)
        if WITH_DQ:
            delta = softmax_delta(tl.sum(probs * grad_probs, axis=1), tl.sum(probs, axis=1))
        else:
            delta = tl.load(delta_ptr + lse_offset + q_tokens, mask=q_inside, other=0.0)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_v += tl.dot(tl.trans(probs.to(q.dtype)), grad, input_precision=DOT_PRECISION, out_dtype=ACC)
        grad_k += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=DOT_PRECISION, out_dtype=ACC)
        if WITH_DQ:
            grad_q = tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
            tl.store(grad_qkv_b + q_tokens[:, None] * 3 * C + q_chans[None, :],
                     grad_q.to(grad_qkv_ptr.dtype.element_ty), mask=q_inside[:, None] & d_mask[None, :])

    grad_k = grad_k * scale
    k_rows = grad_qkv_b + k_tokens[:, None] * 3 * C
    kd_mask = k_inside[:, None] & d_mask[None, :]
    tl.store(k_rows + (C + q_chans)[None, :], grad_k.to(grad_qkv_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(k_rows + (2 * C + q_chans)[None, :], grad_v.to(grad_qkv_ptr.dtype.element_ty), mask=kd_mask)
    if HAS_PADDED_KEYS:
        padded = (k_valid & ~k_inside)[:, None]
        slot = pad_grad_ptr + (tl.program_id(0).to(tl.int64) * (SLOTS // BLOCK_K) + key_block) * 2 * HEAD_DIM
        tl.store(slot + offs_d, tl.sum(tl.where(padded, grad_k, 0.0), axis=0), mask=d_mask)
        tl.store(slot + HEAD_DIM + offs_d, tl.sum(tl.where(padded, grad_v, 0.0), axis=0), mask=d_mask)


@triton.jit(do_not_specialize=_MAP_SIZE_ARGS)
def lsa_backward_dq_kernel(
    qkv_ptr, bias_ptr, lse_ptr, delta_ptr, grad_out_ptr, grad_qkv_ptr, scale_arg,
    H, W, C, HEADS, HEAD_DIM, WINDOWS, WINDOWS_W,
    stride_b, stride_n, stride_c,
    stride_gb, stride_gn, stride_gc,
    WS: tl.constexpr, SLOTS: tl.constexpr, PAD_WITH_BIAS: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta and dQ of BLOCK_Q query slots (block program_id(1)) of one window and head, in two passes
    over the window's key blocks (delta, then dQ): for windows of more than one key block, where
    lsa_backward_kernel has no dQ and reads the delta written here."""
    b, h, y0, x0 = _program_window(HEADS, WINDOWS, WINDOWS_W, WS)
    tokens_per_image = H * W
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_chans = h * HEAD_DIM + offs_d
    qkv_b = qkv_ptr + b * stride_b
    scale = scalar_value(scale_arg, ACC)

    q_slots = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lse_offset = (b * HEADS + h) * tokens_per_image
    q_tokens, q_inside, q, grad, lse = _query_block(
        qkv_b, grad_out_ptr + b * stride_gb, lse_ptr + lse_offset, q_slots, y0, x0, q_chans, d_mask, H, W,
        stride_n, stride_c, stride_gn, stride_gc, WS)

    weighted = tl.zeros((BLOCK_Q,), dtype=ACC)
    total = tl.zeros((BLOCK_Q,), dtype=ACC)
    for k_start in range(0, SLOTS, BLOCK_K):
        k_slots = k_start + tl.arange(0, BLOCK_K)
        _, _, k_valid, k, v = _key_block(qkv_b, bias_ptr, k_slots, y0, x0, H, W, C, q_chans, d_mask,
                                         stride_n, stride_c, WS, PAD_WITH_BIAS)
        probs, grad_probs = _probs_and_grad_probs(q, k, v, grad, lse, q_inside, k_valid, scale, ACC, DOT_PRECISION)
        weighted += tl.sum(probs * grad_probs, axis=1)
        total += tl.sum(probs, axis=1)
    delta = softmax_delta(weighted, total)
    tl.store(delta_ptr + lse_offset + q_tokens, delta, mask=q_inside)

    grad_q = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for k_start in range(0, SLOTS, BLOCK_K):
        k_slots = k_start + tl.arange(0, BLOCK_K)
        _, _, k_valid, k, v = _key_block(qkv_b, bias_ptr, k_slots, y0, x0, H, W, C, q_chans, d_mask,
                                         stride_n, stride_c, WS, PAD_WITH_BIAS)
        probs, grad_probs = _probs_and_grad_probs(q, k, v, grad, lse, q_inside, k_valid, scale, ACC, DOT_PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=ACC)

    tl.store(grad_qkv_ptr + (b * tokens_per_image + q_tokens)[:, None] * 3 * C + q_chans[None, :],
             (grad_q * scale).to(grad_qkv_ptr.dtype.element_ty), mask=q_inside[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LsaTiles:
    slots: int  # ws*ws window slots padded to a power of two, at least 16 (tl.dot's minimum)
    block_q: int  # query slots per block
    block_k: int  # key slots per block
    block_d: int  # head_dim padded to a power of two
    num_warps: int
    num_stages: int
    dq_stages: int  # lsa_backward_dq_kernel's (backward only; see lsa_tiles)


def lsa_tiles(ws: int, head_dim: int, dtype: torch.dtype, backward: bool) -> LsaTiles:
    """H100 tiles. Twins runs ws = 7 (49 slots in a 64-slot tile) at head_dim 32 in every stage: the
    window is one 64 x 64 block, so a program does one window-head in one pass (forward: QK^T, PV;
    backward: five 64 x 64 x D dots, dQ included) and the op is bound by reading qkv. A program per
    (batch, window, head) gives B * windows * heads programs (8192 for SVT-S stage 1 at batch 64): many
    waves of small programs, whose independent loads hide each other's latency; packing more heads or
    windows into a program would add registers, not bandwidth (the heads of a window are neighbouring
    programs and share its cache lines in L2). Blocks stay 64 slots up to 16 x 16 windows (256 slots:
    4 query x 4 key blocks), so the score tile never exceeds 64 x 64. 4 warps; 8 where the head_dim
    doubles the operands (above 64 in the forward, above 32 in the backward, which holds q, k, v, dO,
    dK, dV); 2 for 16-slot windows (ws <= 4). The loops run once for windows of one block (no stages
    to pipeline), so num_stages is 1 there and 2 for windows of several blocks, but for the fp32 and fp64
    dq kernel of such windows: its two passes over the key blocks (delta, then dQ), each pipelined,
    spilled 8-32 bytes a thread for sm_90 (ws 7 and 12, head_dim 32-128), with one stage none; in 16 bits
    neither spills for sm_90 and neither is clean for sm_80 at head_dim 128, ws 12 (two stages: 64 bytes
    in zero mode; one: 136 in mask mode), so it keeps the pipelining. fp32 and fp64 dots run on the FMA
    units, whose operands live in registers: their blocks are 32 slots (16 at head_dim 128;
    ``fma_rows``) on 4 or 8 warps (``fma_warps``), which also keeps every kernel within an A100's and an
    H100's shared memory (tests/triton_aot.py)."""
    slots = max(16, next_pow2(ws * ws))
    block_d = max(16, next_pow2(head_dim))
    if dtype.itemsize == 2:
        block = min(slots, 64)
        if block <= 16:
            num_warps = 2
        else:
            num_warps = 8 if block_d > (32 if backward else 64) else 4
    else:
        block = min(slots, fma_rows(block_d))
        num_warps = fma_warps(block, block_d)
    num_stages = 1 if slots == block else 2
    return LsaTiles(slots, block, block, block_d, num_warps, num_stages,
                    dq_stages=num_stages if dtype.itemsize == 2 else 1)


def _window_grid(height: int, width: int, ws: int) -> tuple[int, int]:
    """(windows per image, windows per row)."""
    rows, cols = _window_counts(height, width, ws)
    return rows * cols, cols


def lsa_forward_triton(qkv, qkv_bias, height: int, width: int, ws: int, num_heads: int, scale: float,
                       mask_padding: bool):
    """(out (B, N, C), lse (B, heads, N)) for qkv (B, N, 3C) of any strides."""
    batch, tokens, chans3 = qkv.shape
    chans = chans3 // 3
    head_dim = chans // num_heads
    acc = accumulation_dtype(qkv.dtype)
    tiles = lsa_tiles(ws, head_dim, qkv.dtype, backward=False)
    windows, windows_w = _window_grid(height, width, ws)
    out = empty_output((batch, tokens, chans), qkv)
    lse = empty_output((batch, num_heads, tokens), qkv, dtype=acc)
    grid = (batch * windows * num_heads, tiles.slots // tiles.block_q)
    with launch_device(qkv):
        lsa_forward_kernel[grid](
            qkv, qkv_bias.contiguous(), out, lse, scalar_arg(scale, qkv, acc),
            height, width, chans, num_heads, head_dim, windows, windows_w, *qkv.stride(),
            WS=ws, SLOTS=tiles.slots, PAD_WITH_BIAS=not mask_padding,
            ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(qkv.dtype),
            BLOCK_Q=tiles.block_q, BLOCK_K=tiles.block_k, BLOCK_D=tiles.block_d,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return out, lse


def lsa_backward_triton(grad_out, qkv, qkv_bias, out, lse, height: int, width: int, ws: int, num_heads: int,
                        scale: float, mask_padding: bool):
    """(grad_qkv (B, N, 3C), the padded keys' share of the bias gradient (3C,) in fp32 (fp64)). ``out`` is
    read by no kernel (delta comes from the probabilities): it is there to match the op's arguments."""
    batch, tokens, chans3 = qkv.shape
    chans = chans3 // 3
    head_dim = chans // num_heads
    acc = accumulation_dtype(qkv.dtype)
    tiles = lsa_tiles(ws, head_dim, qkv.dtype, backward=True)
    windows, windows_w = _window_grid(height, width, ws)
    key_blocks = tiles.slots // tiles.block_k
    has_padded_keys = not mask_padding and (height % ws != 0 or width % ws != 0)
    lse, qkv_bias = lse.contiguous(), qkv_bias.contiguous()  # read with unit strides
    grad_qkv = empty_output((batch, tokens, chans3), qkv)
    base_programs = batch * windows * num_heads
    if has_padded_keys:
        # per (program, key block): the padded keys' dK and dV sums, reduced below in a fixed order
        pad_grad = empty_output((batch * windows, num_heads, key_blocks, 2, head_dim), qkv, dtype=acc)
    else:
        pad_grad = grad_qkv  # never written: HAS_PADDED_KEYS is off
    common = dict(
        WS=ws, SLOTS=tiles.slots, PAD_WITH_BIAS=not mask_padding, ACC=TRITON_DTYPES[acc],
        DOT_PRECISION=dot_precision(qkv.dtype), BLOCK_Q=tiles.block_q, BLOCK_K=tiles.block_k,
        BLOCK_D=tiles.block_d, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    dims = (height, width, chans, num_heads, head_dim, windows, windows_w, *qkv.stride(), *grad_out.stride())
    scale_arg = scalar_arg(scale, qkv, acc)
    with_dq = key_blocks == 1  # the dk/dv kernel computes dq and delta too
    # delta, from the dq kernel for the dk/dv kernel; lse stands in, unread, with_dq
    delta = lse if with_dq else empty_output(lse.shape, qkv, dtype=acc)
    with launch_device(qkv):
        if not with_dq:
            lsa_backward_dq_kernel[(base_programs, tiles.slots // tiles.block_q)](
                qkv, qkv_bias, lse, delta, grad_out, grad_qkv, scale_arg, *dims,
                **{**common, "num_stages": tiles.dq_stages},
            )
        lsa_backward_kernel[(base_programs, key_blocks)](
            qkv, qkv_bias, lse, delta, grad_out, grad_qkv, pad_grad, scale_arg, *dims,
            HAS_PADDED_KEYS=has_padded_keys, WITH_DQ=with_dq, **common,
        )
    grad_bias = torch.zeros(chans3, device=qkv.device, dtype=acc)
    if has_padded_keys:
        per_head = pad_grad.sum(dim=(0, 2))  # (heads, 2, D)
        grad_bias[chans:] = per_head.transpose(0, 1).reshape(2 * chans)
    return grad_qkv, grad_bias


# ----------------------------------------------------------------------------------------------
# Backend dispatch, torch.library registration, autograd
# ----------------------------------------------------------------------------------------------
def _kernel_backend(qkv: torch.Tensor, num_heads: int, ws: int, requested: str) -> str:
    backend = attention_backend(qkv, qkv.shape[2] // 3, num_heads, requested)
    if backend != "torch" and ws > MAX_WS:
        return reference_outside_kernels(requested, backend, f"ws = {ws} is above {MAX_WS}")
    return backend


@autocast_neutral
def lsa_forward(
    qkv: torch.Tensor, qkv_bias: torch.Tensor, height: int, width: int, ws: int, num_heads: int,
    scale: float, pad_mode: str, backend: str, map_size: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = map_size_of("lsa_forward", qkv.shape[1], height, width, map_size)
    # decided here, on the map the op runs on: a trace's or a dynamic graph's size is not the one it was made at
    args = (qkv, qkv_bias, height, width, ws, num_heads, scale, masks_padding(pad_mode, height, width, ws))
    kernel = _kernel_backend(qkv, num_heads, ws, backend)
    if kernel == "triton":
        return lsa_forward_triton(*args)
    if kernel == "cuda":
        out, lse = cuda_ops().lsa_forward(*args)
        return out, lse
    return _reference_forward(*args)


lsa_forward_op = torch.library.custom_op("twins_kernels::lsa_forward", lsa_forward, mutates_args=())


@lsa_forward_op.register_fake
def _(qkv, qkv_bias, height, width, ws, num_heads, scale, pad_mode, backend, map_size=None):
    batch, tokens, chans3 = qkv.shape
    return (qkv.new_empty((batch, tokens, chans3 // 3)),
            qkv.new_empty((batch, num_heads, tokens), dtype=accumulation_dtype(qkv.dtype)))


@autocast_neutral
def lsa_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    height: int, width: int, ws: int, num_heads: int, scale: float, pad_mode: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _kernel_backend(qkv, num_heads, ws, backend)
    mask_padding = masks_padding(pad_mode, height, width, ws)
    if kernel == "triton":
        grad_qkv, grad_bias = lsa_backward_triton(grad_out, qkv, qkv_bias, out, lse, height, width, ws, num_heads,
                                                  scale, mask_padding)
    elif kernel == "cuda":
        grad_qkv, grad_bias = cuda_ops().lsa_backward(grad_out, qkv, qkv_bias, out, lse, height, width, ws,
                                                       num_heads, scale, mask_padding)
    else:
        grad_qkv, grad_bias = _reference_backward(grad_out, qkv, qkv_bias, out, lse, height, width, ws, num_heads,
                                                  scale, mask_padding)
    return grad_qkv, grad_bias.to(qkv_bias.dtype)


lsa_backward_op = torch.library.custom_op("twins_kernels::lsa_backward", lsa_backward, mutates_args=())


@lsa_backward_op.register_fake
def _(grad_out, qkv, qkv_bias, out, lse, height, width, ws, num_heads, scale, pad_mode, backend):
    return qkv.new_empty(qkv.shape), qkv_bias.new_empty(qkv_bias.shape)


run_lsa_backward = kernel_backward_entry(lsa_backward_op, lsa_backward, "lsa")


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, height, width, ws, num_heads, scale, pad_mode, backend, map_size = inputs
    height, width = map_size_of("lsa_forward", qkv.shape[1], height, width, map_size)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, qkv_bias, out, lse)
    ctx.args = (height, width, ws, num_heads, scale, pad_mode, call_choice(backend))


def _backward(ctx, grad_out, _grad_lse):
    qkv, qkv_bias, out, lse = ctx.saved_tensors
    grad_qkv, grad_bias = run_lsa_backward(grad_out, qkv, qkv_bias, out, lse, *ctx.args)
    return grad_qkv, grad_bias, None, None, None, None, None, None, None, None


run_lsa_forward = kernel_op_entry(lsa_forward_op, lsa_forward, _setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def lsa(qkv, qkv_bias, size, num_heads: int, ws: int, scale: float | None = None, pad_mode: str = "zero",
        backend: str | None = None):
    """LSA's attention core: softmax(q k^T * scale) v inside each ws x ws window, per head.

    ``qkv`` (B, N, 3C) is the qkv Linear's output on the tokens of an H x W map, ``size`` = (H, W), any
    strides: head h's q, k, v are channels h*D, C + h*D, 2C + h*D (+ 0..D-1), D = C / num_heads.
    ``qkv_bias`` (3C,) is the Linear's bias: what a position of the map padded to multiples of ws holds.
    ``scale`` defaults to D ** -0.5. ``pad_mode``: "zero" (timm: padded keys hold the bias and take part
    in the softmax), "mask" (padded keys are excluded, as mmsegmentation means to) or "mmseg"
    (mmsegmentation's code as it runs: "mask" where the map is padded on both sides, else "zero";
    ``masks_padding``). Returns (B, N, C) in token order.
    ``backend``: "auto" | "triton" | "cuda" | "torch", or None for the ambient choice; the kernel
    backends need D in 16..128 and ws <= 16 (``auto`` runs the reference outside them); ws >= 2.
    """
    _, _, chans3, height, width = check_tokens(qkv, size, name="qkv")
    if chans3 % 3 != 0:
        raise ValueError(f"qkv has {chans3} channels; expected 3C (q, k and v), a multiple of 3")
    chans = chans3 // 3
    num_heads = check_int(num_heads, "num_heads")
    if chans % num_heads != 0:
        raise ValueError(f"C = {chans3} / 3 = {chans} is not divisible by num_heads={num_heads}")
    ws = check_int(ws, "ws", MIN_WS)
    check_param(qkv_bias, "qkv_bias", (chans3,), qkv)
    check_pad_mode(pad_mode)
    scale = (chans // num_heads) ** -0.5 if scale is None else check_float(scale, "scale")
    choice = call_choice(backend)
    if not torch.compiler.is_compiling():
        _kernel_backend(qkv, num_heads, ws, choice)  # fail here, naming what is wrong, not inside the op
    return run_lsa_forward(qkv, qkv_bias, height, width, ws, num_heads, float(scale), pad_mode,
                          choice, traced_map_size(size))[0]
