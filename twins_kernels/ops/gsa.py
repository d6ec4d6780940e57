"""GSA, timm's ``GlobalSubSampleAttn``: global attention of every token over sub-sampled keys.

    q   = Linear(x)                                     (B, N, C), heads = reshape(B, N, heads, D)
    x'  = LayerNorm(Conv2d(x as (B, C, H, W), kernel = stride = sr))     (B, M, C), sr > 1 only
    kv  = Linear(x')                                    (B, M, 2C), = reshape(B, M, 2, heads, D)
    out = softmax(q k^T * scale) v                      (B, N, C), in token order for ``proj``

The Linears stay cuBLAS calls (nn.Linear); this module provides the two parts in between.

The attention core (``gsa_attention``) is flash-style: each program streams key blocks through an
online softmax with fp32 accumulation (fp64 for float64 inputs) and never holds an N x M score matrix;
q is read from (B, N, C) and k, v from the (B, M, 2C) kv tensor by head strides (any strides), and out
is written to (B, N, C) in token order: no permute copies. The forward saves the log-sum-exp per
(batch, head, query); the backward recomputes the probabilities from it:
  the dk/dv kernel (one program per key block and head, looping over query blocks): where the M keys
  are one block (up to 64 in 16 bits: 49 at every Twins stage at 224 x 224), it is the whole backward,
  computing for each query block delta = rowsum(P * dP) / rowsum(P) from the probabilities (not
  rowsum(dO * O) from the rounded O: NOTES 34, 37) and dq too. Past one block, the dq kernel (one
  program per query block and head, looping over key blocks) runs first, computes delta =
  rowsum(dO * O) and stores it for the dk/dv kernel, then dq. With few key blocks the query loop is
  split across programs that write fp32 partials, summed by one ``sum``. No atomics anywhere: the
  gradients are bitwise reproducible.

The sub-sampling (``gsa_subsample``) is the stride-sr conv as a patch GEMM: a patch's K = sr*sr*C
inputs are sr*sr token rows of C channels, read from (B, N, C) by index arithmetic (rows and columns
past the last full patch are never read, which is the conv's flooring). The forward kernel adds the
bias and applies the LayerNorm (fp32 statistics, chunked Welford over channels) in its epilogue, and
saves the conv output y (B, M, C) in fp32 with the row mean and 1/std for the backward. The backward is three kernels:
the LayerNorm backward per row (which also reduces the LayerNorm and conv-bias gradients into
per-program partials), the conv-weight gradient (dy^T @ patches, each program owning a weight tile
and looping over all rows) and the input gradient (dy @ weight, scattered straight to the patch
tokens: a pixel belongs to at most one patch, so no atomics); pixels outside every patch get zero.

Backends (see ``twins_kernels.backend``):
  triton  both parts as above.
  cuda    the attention core runs ``torch.ops.twins_kernels_cuda.gsa_attention_forward/backward``
          (float32, float16, bfloat16; float64 runs the PyTorch reference); the sub-sampling runs
          the PyTorch reference (cuDNN's conv2d + LayerNorm math): the extension has no kernels
          for it.
  torch   the PyTorch reference for both; the attention is PyTorch's fused attention kernel on CPU (it
          returns the log-sum-exp too) and elsewhere runs in query chunks (memory chunk x M).
  With ``auto``, a head_dim outside 16..128 runs the reference; naming triton or cuda raises.

The CUDA extension's contract (csrc/twins_kernels.h), the same as the Triton launchers'
``gsa_attention_forward_triton`` / ``gsa_attention_backward_triton`` (which also take float64, with an
fp64 lse):
  gsa_attention_forward(Tensor q, Tensor kv, int num_heads, float scale) -> (Tensor out, Tensor lse)
      q   (B, N, C), kv (B, M, 2C): fp32 / fp16 / bf16, one dtype, any strides, C % num_heads == 0,
          head_dim = C / num_heads in 16..128, M >= 1; k of head h is kv[..., h*D:(h+1)*D] and v is
          kv[..., C + h*D : C + (h+1)*D].
      out (B, N, C) contiguous, q's dtype, head h in channels h*D:(h+1)*D (token order, for proj).
      lse (B, num_heads, N) contiguous float32: log sum_j exp(scale * q_i . k_j) per query.
  gsa_attention_backward(Tensor grad_out, Tensor q, Tensor kv, Tensor out, Tensor lse, int num_heads,
                         float scale) -> (Tensor grad_q, Tensor grad_kv)
      grad_out (B, N, C) any strides; q, kv, num_heads, scale as given to the forward; out and lse
      the forward's outputs. grad_q (B, N, C) and grad_kv (B, M, 2C), contiguous, q's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ._triton import TRITON_DTYPES, scalar_value, softmax_delta, tl, triton
from .common import (
    KERNEL_DTYPES,
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
    op_backend,
    pow2_block,
    scalar_arg,
    scores_grad,
    traced_map_size,
    unit_channel_stride,
)

REFERENCE_QUERY_CHUNK = 1024  # the reference attention holds chunk x M scores, never N x M
NORM_PARTIAL_SLOTS = 3  # LayerNorm weight, LayerNorm bias, conv bias


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
def gsa_subsample_reference(x, size, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio: int, eps: float = 1e-5):
    """timm's ``norm(sr(x))`` on (B, N, C) tokens: (B, M, C) with M = (H // sr) * (W // sr)."""
    batch, _, chans = x.shape
    feat = x.transpose(1, 2).reshape(batch, chans, *size)
    y = F.conv2d(feat, sr_weight, sr_bias, stride=sr_ratio).flatten(2).transpose(1, 2)
    return F.layer_norm(y, (chans,), norm_weight, norm_bias, eps)


def gsa_attention_reference(q, kv, num_heads: int, scale: float | None = None, dropout_p: float = 0.0):
    """timm's attention on q (B, N, C) and kv (B, M, 2C) through SDPA, with attention dropout."""
    batch, tokens, chans = q.shape
    head_dim = chans // num_heads
    q = q.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, -1, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, chans)


def _heads(t: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, heads * D) -> (B, heads, L, D) in ``dtype``."""
    batch, length, chans = t.shape
    return t.to(dtype).reshape(batch, length, num_heads, chans // num_heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, L, D) -> contiguous (B, L, heads * D) in ``dtype``."""
    batch, heads, length, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * head_dim).to(dtype).contiguous()


def _attention_forward_reference(q, kv, num_heads: int, scale: float):
    """(out, lse) of the torch backend: on CPU, PyTorch's fused attention kernel (fp32 accumulation),
    which returns the log-sum-exp too, so a patched model runs as fast as timm on CPU; elsewhere (the
    torch backend asked for on a GPU) the same math in query chunks."""
    if not fused_cpu_attention(q):
        return _attention_forward_chunked(q, kv, num_heads, scale)
    chans = q.shape[2]
    qh, k, v = unit_channel_stride(*(_heads(t, num_heads, q.dtype) for t in (q, kv[..., :chans], kv[..., chans:])))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, k, v, 0.0, False, scale=scale)
    return _merge_heads(out, q.dtype), lse.contiguous()


def _attention_backward_reference(grad_out, q, kv, out, lse, num_heads: int, scale: float):
    """(grad_q, grad_kv) of the torch backend: PyTorch's fused CPU attention backward on CPU, chunks elsewhere."""
    if not fused_cpu_attention(q):
        return _attention_backward_chunked(grad_out, q, kv, lse, num_heads, scale)
    chans = q.shape[2]
    heads = unit_channel_stride(*(_heads(t, num_heads, q.dtype)
                                  for t in (grad_out, q, kv[..., :chans], kv[..., chans:], out)))
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *heads, lse, 0.0, False, scale=scale)
    grad_kv = torch.cat([_merge_heads(grad_k, q.dtype), _merge_heads(grad_v, q.dtype)], dim=-1)
    return _merge_heads(grad_q, q.dtype), grad_kv


def _attention_forward_chunked(q, kv, num_heads: int, scale: float):
    acc = accumulation_dtype(q.dtype)
    chans = q.shape[2]
    qh, k, v = (_heads(t, num_heads, acc) for t in (q, kv[..., :chans], kv[..., chans:]))
    out = torch.empty_like(qh)
    lse = torch.empty(qh.shape[:3], device=q.device, dtype=acc)
    for start in range(0, qh.shape[2], REFERENCE_QUERY_CHUNK):
        rows = slice(start, start + REFERENCE_QUERY_CHUNK)
        scores = qh[:, :, rows] @ k.transpose(-1, -2) * scale
        lse[:, :, rows] = scores.logsumexp(-1)
        out[:, :, rows] = torch.exp(scores - lse[:, :, rows, None]) @ v
    return _merge_heads(out, q.dtype), lse


def _attention_backward_chunked(grad_out, q, kv, lse, num_heads: int, scale: float):
    """The backward in query chunks, each holding all M keys' probabilities (``scores_grad``)."""
    acc = accumulation_dtype(q.dtype)
    chans = q.shape[2]
    qh, k, v = (_heads(t, num_heads, acc) for t in (q, kv[..., :chans], kv[..., chans:]))
    grad = _heads(grad_out, num_heads, acc)
    grad_q, grad_k, grad_v = torch.empty_like(qh), torch.zeros_like(k), torch.zeros_like(v)
    for start in range(0, qh.shape[2], REFERENCE_QUERY_CHUNK):
        rows = slice(start, start + REFERENCE_QUERY_CHUNK)
        probs = torch.exp(qh[:, :, rows] @ k.transpose(-1, -2) * scale - lse[:, :, rows, None])
        grad_v += probs.transpose(-1, -2) @ grad[:, :, rows]
        grad_scores = scores_grad(probs, grad[:, :, rows] @ v.transpose(-1, -2))
        grad_q[:, :, rows] = grad_scores @ k * scale
        grad_k += grad_scores.transpose(-1, -2) @ qh[:, :, rows] * scale
    grad_kv = torch.cat([_merge_heads(grad_k, q.dtype), _merge_heads(grad_v, q.dtype)], dim=-1)
    return _merge_heads(grad_q, q.dtype), grad_kv


def _subsample_forward_reference(x, sr_weight, sr_bias, norm_weight, norm_bias, height, width, sr_ratio, eps):
    acc = accumulation_dtype(x.dtype)
    batch, _, chans = x.shape
    feat = x.transpose(1, 2).reshape(batch, chans, height, width)
    weight, bias = sr_weight.to(x.dtype), sr_bias.to(x.dtype)
    y = F.conv2d(feat, weight, bias, stride=sr_ratio).flatten(2).transpose(1, 2).to(acc).contiguous()
    out, mean, rstd = torch.native_layer_norm(y, (chans,), norm_weight.to(acc), norm_bias.to(acc), eps)
    return out.to(x.dtype), y, mean.squeeze(-1), rstd.squeeze(-1)


def _subsample_backward_reference(grad_out, x, sr_weight, norm_weight, y, mean, rstd, height, width, sr_ratio):
    batch, _, chans = x.shape
    grad = grad_out.to(y.dtype)
    grad_y, grad_norm_weight, _ = torch.ops.aten.native_layer_norm_backward(
        grad, y, (chans,), mean[..., None], rstd[..., None], norm_weight.to(y.dtype), None, [True, True, False])
    out_h, out_w = height // sr_ratio, width // sr_ratio
    grad_map = grad_y.to(x.dtype).transpose(1, 2).reshape(batch, chans, out_h, out_w)
    feat = x.transpose(1, 2).reshape(batch, chans, height, width)
    # the input and weight gradients from one call, as autograd's conv backward takes them; the bias's is
    # the LayerNorm's fp32 grad_y summed, as the kernels sum it (autograd's would be in x's dtype)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_map, feat, sr_weight.to(x.dtype), None, [sr_ratio, sr_ratio], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False])
    return (
        grad_x.flatten(2).transpose(1, 2).contiguous(),
        grad_w.to(sr_weight.dtype).contiguous(),
        grad_y.sum((0, 1)).to(sr_weight.dtype),
        grad_norm_weight.to(norm_weight.dtype),
        grad.sum((0, 1)).to(norm_weight.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Triton kernels: attention core
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_batch_head(ROWS, BLOCK: tl.constexpr, HEADS):
    """(row block, batch, head) of a program on a 1-D grid of B * heads * cdiv(ROWS, BLOCK) programs.
    One (batch, head)'s blocks run next to each other (they share its keys and values in L2); a 1-D
    grid takes any B * heads, where a grid's second axis stops at 65535 (batch 2048 at 32 heads)."""
    blocks = tl.cdiv(ROWS, BLOCK)
    pid = tl.program_id(0)
    bh = pid // blocks
    return pid % blocks, (bh // HEADS).to(tl.int64), bh % HEADS


# do_not_specialize: the token, key and row counts vary with the image (see lsa._MAP_SIZE_ARGS)
@triton.jit(do_not_specialize=["N", "M"])
def gsa_attention_forward_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr, scale_arg,
    N, M, C, HEADS, HEAD_DIM,
    stride_qb, stride_qn, stride_qc,
    stride_kvb, stride_kvm, stride_kvc,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of BLOCK_M queries of one (batch, head) against all M keys, online softmax."""
    block, b, h = _block_batch_head(N, BLOCK_M, HEADS)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM
    head_chans = (h * HEAD_DIM + offs_d).to(tl.int64)  # times a channel stride that may be B * N
    scale = scalar_value(scale_arg, ACC)

    q = tl.load(q_ptr + b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qn + head_chans[None, :] * stride_qc,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = kv_ptr + b * stride_kvb + head_chans[:, None] * stride_kvc  # (BLOCK_D, 1): k^T columns
    v_ptrs = kv_ptr + b * stride_kvb + (C + head_chans)[None, :] * stride_kvc

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        key_rows = offs_n.to(tl.int64) * stride_kvm
        k_t = tl.load(k_ptrs + key_rows[None, :], mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        # the first block always holds key 0, so new_max is finite from the first iteration on
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        v = tl.load(v_ptrs + key_rows[:, None], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=ACC)
        row_max = new_max

    out = acc / row_sum[:, None]
    tokens = b * N + offs_m
    tl.store(out_ptr + tokens[:, None] * C + head_chans[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + (b * HEADS + h) * N + offs_m, row_max + tl.log(row_sum), mask=m_mask)


@triton.jit(do_not_specialize=["N", "M"])
def gsa_attention_dq_kernel(
    q_ptr, kv_ptr, out_ptr, grad_out_ptr, lse_ptr, scale_arg, delta_ptr, grad_q_ptr,
    N, M, C, HEADS, HEAD_DIM,
    stride_qb, stride_qn, stride_qc,
    stride_kvb, stride_kvm, stride_kvc,
    stride_gb, stride_gn, stride_gc,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) and dq = scale * sum_j P_ij (dP_ij - delta_i) k_j for one query block."""
    block, b, h = _block_batch_head(N, BLOCK_M, HEADS)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    head_chans = (h * HEAD_DIM + offs_d).to(tl.int64)  # times a channel stride that may be B * N
    scale = scalar_value(scale_arg, ACC)

    q = tl.load(q_ptr + b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qn + head_chans[None, :] * stride_qc,
                mask=md_mask, other=0.0)
    grad = tl.load(grad_out_ptr + b * stride_gb + offs_m[:, None].to(tl.int64) * stride_gn
                   + head_chans[None, :] * stride_gc, mask=md_mask, other=0.0).to(q.dtype)
    tokens = b * N + offs_m
    out = tl.load(out_ptr + tokens[:, None] * C + head_chans[None, :], mask=md_mask, other=0.0)
    delta = tl.sum(grad.to(ACC) * out.to(ACC), axis=1)
    row = (b * HEADS + h) * N + offs_m
    tl.store(delta_ptr + row, delta, mask=m_mask)
    lse = tl.load(lse_ptr + row, mask=m_mask, other=0.0)

    k_ptrs = kv_ptr + b * stride_kvb + head_chans[:, None] * stride_kvc
    v_ptrs = kv_ptr + b * stride_kvb + (C + head_chans)[:, None] * stride_kvc
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        dn_mask = d_mask[:, None] & n_mask[None, :]
        key_rows = offs_n.to(tl.int64)[None, :] * stride_kvm
        k_t = tl.load(k_ptrs + key_rows, mask=dn_mask, other=0.0)
        v_t = tl.load(v_ptrs + key_rows, mask=dn_mask, other=0.0)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        probs = tl.where(n_mask[None, :], tl.exp(scores - lse[:, None]), 0.0)
        grad_probs = tl.dot(grad, v_t, input_precision=DOT_PRECISION, out_dtype=ACC)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION, out_dtype=ACC)

    tl.store(grad_q_ptr + tokens[:, None] * C + head_chans[None, :],
             (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=md_mask)


@triton.jit(do_not_specialize=["N", "M", "QUERIES_PER_SPLIT"])
def gsa_attention_dkdv_kernel(
    q_ptr, kv_ptr, grad_out_ptr, lse_ptr, scale_arg, delta_ptr, grad_q_ptr, grad_kv_ptr,
    N, M, C, HEADS, HEAD_DIM, QUERIES_PER_SPLIT,
    stride_qb, stride_qn, stride_qc,
    stride_kvb, stride_kvm, stride_kvc,
    stride_gb, stride_gn, stride_gc,
    stride_split, stride_ob, stride_om,
    WITH_DQ: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of one key block and head, summed over the queries of split ``program_id(1)``;
    written to grad_kv_ptr[split] (a (B, M, 2C) slice, channel stride 1). With WITH_DQ (all M keys are
    this one block) also dq of the split's queries, and delta = rowsum(P * dP) / rowsum(P) from the
    probabilities (``softmax_delta``; delta_ptr is not read): the whole backward in one pass over q and
    dO, where the dq kernel and this one read both (and the dq kernel O) each."""
    block, b, h = _block_batch_head(M, BLOCK_N, HEADS)
    split = tl.program_id(1)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < M
    d_mask = offs_d < HEAD_DIM
    nd_mask = n_mask[:, None] & d_mask[None, :]
    head_chans = (h * HEAD_DIM + offs_d).to(tl.int64)  # times a channel stride that may be B * N
    scale = scalar_value(scale_arg, ACC)

    key_rows = kv_ptr + b * stride_kvb + offs_n[:, None].to(tl.int64) * stride_kvm
    k = tl.load(key_rows + head_chans[None, :] * stride_kvc, mask=nd_mask, other=0.0)
    v = tl.load(key_rows + (C + head_chans)[None, :] * stride_kvc, mask=nd_mask, other=0.0)

    grad_k = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    grad_v = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    q_start = split * QUERIES_PER_SPLIT
    q_end = tl.minimum(q_start + QUERIES_PER_SPLIT, N)
    for start_m in range(q_start, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_end
        dm_mask = d_mask[:, None] & m_mask[None, :]
        query_cols = offs_m.to(tl.int64)[None, :]
        q_t = tl.load(q_ptr + b * stride_qb + query_cols * stride_qn + head_chans[:, None] * stride_qc,
                      mask=dm_mask, other=0.0)
        grad_t = tl.load(grad_out_ptr + b * stride_gb + query_cols * stride_gn + head_chans[:, None] * stride_gc,
                         mask=dm_mask, other=0.0).to(q_t.dtype)
        row = (b * HEADS + h) * N + offs_m
        lse = tl.load(lse_ptr + row, mask=m_mask, other=0.0)
        scores_t = tl.dot(k, q_t, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
        probs_t = tl.where(n_mask[:, None] & m_mask[None, :], tl.exp(scores_t - lse[None, :]), 0.0)
        grad_v += tl.dot(probs_t.to(q_t.dtype), tl.trans(grad_t), input_precision=DOT_PRECISION, out_dtype=ACC)
        grad_probs_t = tl.dot(v, grad_t, input_precision=DOT_PRECISION, out_dtype=ACC)
        if WITH_DQ:
            delta = softmax_delta(tl.sum(probs_t * grad_probs_t, axis=0), tl.sum(probs_t, axis=0))
        else:
            delta = tl.load(delta_ptr + row, mask=m_mask, other=0.0)
        grad_scores_t = (probs_t * (grad_probs_t - delta[None, :])).to(q_t.dtype)
        grad_k += tl.dot(grad_scores_t, tl.trans(q_t), input_precision=DOT_PRECISION, out_dtype=ACC)
        if WITH_DQ:
            grad_q = tl.dot(tl.trans(grad_scores_t), k, input_precision=DOT_PRECISION, out_dtype=ACC) * scale
            tl.store(grad_q_ptr + (b * N + offs_m)[:, None] * C + head_chans[None, :],
                     grad_q.to(grad_q_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    out_rows = (grad_kv_ptr + split.to(tl.int64) * stride_split + b * stride_ob
                + offs_n[:, None].to(tl.int64) * stride_om)
    tl.store(out_rows + head_chans[None, :], (grad_k * scale).to(grad_kv_ptr.dtype.element_ty), mask=nd_mask)
    tl.store(out_rows + (C + head_chans)[None, :], grad_v.to(grad_kv_ptr.dtype.element_ty), mask=nd_mask)


# ----------------------------------------------------------------------------------------------
# Triton kernels: sub-sampling (stride-sr conv as a patch GEMM, bias, LayerNorm)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _patch_rows(rows, KEYS, OUT_W, W, SR):
    """(batch, token of the patch's top-left pixel) of output rows ``rows`` = b * M + m."""
    b = (rows // KEYS).to(tl.int64)
    m = rows % KEYS
    return b, (m // OUT_W) * SR * W + (m % OUT_W) * SR


@triton.jit(do_not_specialize=["ROWS", "KEYS", "OUT_W", "W"])
def gsa_subsample_forward_kernel(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, eps_arg,
    ROWS, KEYS, OUT_W, W, C, SR,
    stride_xb, stride_xn, stride_xc,
    stride_wi, stride_wj, stride_wc, stride_wo,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """LayerNorm(conv(x) + bias) for BLOCK_R output rows (patches), every output channel.

    Pass 1 runs the patch GEMM one BLOCK_CO chunk of output channels at a time, stores y = conv + bias
    (kept for the backward) and merges the chunk's mean and sum of squared deviations into the row's
    (Chan et al.'s parallel variance: no cancellation, any C). Pass 2 normalizes the stored y.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < ROWS
    b, top_left = _patch_rows(rows, KEYS, OUT_W, W, SR)
    patch_ptrs = x_ptr + b * stride_xb + top_left.to(tl.int64) * stride_xn
    y_rows = rows.to(tl.int64)[:, None] * C

    mean = tl.zeros((BLOCK_R,), dtype=ACC)
    sq_dev = tl.zeros((BLOCK_R,), dtype=ACC)
    count = tl.zeros((BLOCK_R,), dtype=ACC)  # channels merged so far
    for co_start in range(0, C, BLOCK_CO):
        offs_co = co_start + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < C
        acc = tl.zeros((BLOCK_R, BLOCK_CO), dtype=ACC)
        for tap in range(0, SR * SR):
            i = tap // SR
            j = tap % SR
            tap_ptrs = patch_ptrs + (i * W + j).to(tl.int64) * stride_xn
            w_tap = w_ptr + i * stride_wi + j * stride_wj
            for c_start in range(0, C, BLOCK_K):
                offs_c = c_start + tl.arange(0, BLOCK_K)
                c_mask = offs_c < C
                x_tile = tl.load(tap_ptrs[:, None] + offs_c[None, :].to(tl.int64) * stride_xc,
                                 mask=r_mask[:, None] & c_mask[None, :], other=0.0)
                w_tile = tl.load(w_tap + offs_c[:, None] * stride_wc + offs_co[None, :] * stride_wo,
                                 mask=c_mask[:, None] & co_mask[None, :], other=0.0)
                acc += tl.dot(x_tile, w_tile, input_precision=DOT_PRECISION, out_dtype=ACC)
        acc += tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC)[None, :]
        tl.store(y_ptr + y_rows + offs_co[None, :], acc, mask=r_mask[:, None] & co_mask[None, :])

        chunk_count = tl.sum(co_mask.to(ACC), axis=0)
        chunk_mean = tl.sum(tl.where(co_mask[None, :], acc, 0.0), axis=1) / chunk_count
        dev = tl.where(co_mask[None, :], acc - chunk_mean[:, None], 0.0)
        shift = chunk_mean - mean
        total = count + chunk_count
        mean += shift * (chunk_count / total)
        sq_dev += tl.sum(dev * dev, axis=1) + shift * shift * (count * chunk_count / total)
        count = total

    eps = scalar_value(eps_arg, ACC)
    rstd = 1.0 / tl.sqrt(sq_dev / C + eps)
    tl.store(mean_ptr + rows, mean, mask=r_mask)
    tl.store(rstd_ptr + rows, rstd, mask=r_mask)
    tl.debug_barrier()  # pass 2 reads y that other threads of this program stored
    for co_start in range(0, C, BLOCK_CO):
        offs_co = co_start + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < C
        rc_mask = r_mask[:, None] & co_mask[None, :]
        y = tl.load(y_ptr + y_rows + offs_co[None, :], mask=rc_mask, other=0.0)
        gamma = tl.load(gamma_ptr + offs_co, mask=co_mask, other=0.0).to(ACC)
        beta = tl.load(beta_ptr + offs_co, mask=co_mask, other=0.0).to(ACC)
        out = (y - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(out_ptr + y_rows + offs_co[None, :], out.to(out_ptr.dtype.element_ty), mask=rc_mask)


@triton.jit(do_not_specialize=["ROWS", "KEYS"])
def gsa_subsample_norm_backward_kernel(
    grad_ptr, y_ptr, mean_ptr, rstd_ptr, gamma_ptr, grad_y_ptr, partial_ptr,
    ROWS, KEYS, C,
    stride_gb, stride_gm, stride_gc,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """LayerNorm backward for BLOCK_R rows: grad_y = rstd * (g' - mean(g') - xhat * mean(g' * xhat)) with
    g' = grad * gamma, stored in grad_y's dtype for the conv GEMMs. partial[program] gets this block's
    sums over rows of grad * xhat, grad and grad_y (LayerNorm weight, LayerNorm bias, conv bias)."""
    program = tl.program_id(0)
    rows = program * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < ROWS
    b = (rows // KEYS).to(tl.int64)
    grad_rows = grad_ptr + b * stride_gb + (rows % KEYS).to(tl.int64) * stride_gm
    y_rows = rows.to(tl.int64)[:, None] * C
    mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)[:, None]
    partial = partial_ptr + program.to(tl.int64) * 3 * C  # NORM_PARTIAL_SLOTS rows of C

    sum_grad_xhat = tl.zeros((BLOCK_R,), dtype=ACC)
    sum_grad_xhat_xhat = tl.zeros((BLOCK_R,), dtype=ACC)
    for co_start in range(0, C, BLOCK_CO):
        offs_co = co_start + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < C
        rc_mask = r_mask[:, None] & co_mask[None, :]
        grad = tl.load(grad_rows[:, None] + offs_co[None, :].to(tl.int64) * stride_gc, mask=rc_mask, other=0.0).to(ACC)
        xhat = (tl.load(y_ptr + y_rows + offs_co[None, :], mask=rc_mask, other=0.0) - mean) * rstd
        grad_xhat = grad * tl.load(gamma_ptr + offs_co, mask=co_mask, other=0.0).to(ACC)[None, :]
        sum_grad_xhat += tl.sum(grad_xhat, axis=1)
        sum_grad_xhat_xhat += tl.sum(grad_xhat * xhat, axis=1)
        tl.store(partial + offs_co, tl.sum(grad * xhat, axis=0), mask=co_mask)
        tl.store(partial + C + offs_co, tl.sum(grad, axis=0), mask=co_mask)

    mean_grad_xhat = (sum_grad_xhat / C)[:, None]
    mean_grad_xhat_xhat = (sum_grad_xhat_xhat / C)[:, None]
    for co_start in range(0, C, BLOCK_CO):
        offs_co = co_start + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < C
        rc_mask = r_mask[:, None] & co_mask[None, :]
        grad = tl.load(grad_rows[:, None] + offs_co[None, :].to(tl.int64) * stride_gc, mask=rc_mask, other=0.0).to(ACC)
        xhat = (tl.load(y_ptr + y_rows + offs_co[None, :], mask=rc_mask, other=0.0) - mean) * rstd
        grad_xhat = grad * tl.load(gamma_ptr + offs_co, mask=co_mask, other=0.0).to(ACC)[None, :]
        grad_y = tl.where(rc_mask, rstd * (grad_xhat - mean_grad_xhat - xhat * mean_grad_xhat_xhat), 0.0)
        tl.store(grad_y_ptr + y_rows + offs_co[None, :], grad_y.to(grad_y_ptr.dtype.element_ty), mask=rc_mask)
        tl.store(partial + 2 * C + offs_co, tl.sum(grad_y, axis=0), mask=co_mask)


@triton.jit(do_not_specialize=["ROWS", "KEYS", "OUT_W", "W"])
def gsa_subsample_weight_grad_kernel(
    grad_y_ptr, x_ptr, grad_w_ptr,
    ROWS, KEYS, OUT_W, W, C, SR,
    stride_xb, stride_xn, stride_xc,
    stride_go, stride_gc, stride_gi, stride_gj,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_w[co, c, i, j] = sum over rows of grad_y[row, co] * x[patch pixel (i, j) of row, c], for one
    (BLOCK_CO x BLOCK_C) tile of one tap (i, j); the program reduces over every row itself."""
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    c_blocks = tl.cdiv(C, BLOCK_C)
    tap = tl.program_id(0) // c_blocks  # taps x channel blocks on axis 0: sr * sr grows past axis 1's 65535
    offs_c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tap // SR
    j = tap % SR
    co_mask = offs_co < C
    c_mask = offs_c < C

    acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=ACC)
    for r_start in range(0, ROWS, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        r_mask = rows < ROWS
        b, top_left = _patch_rows(rows, KEYS, OUT_W, W, SR)
        grad_y_t = tl.load(grad_y_ptr + rows.to(tl.int64)[None, :] * C + offs_co[:, None],
                           mask=co_mask[:, None] & r_mask[None, :], other=0.0)
        x_rows = x_ptr + b * stride_xb + (top_left + i * W + j).to(tl.int64) * stride_xn
        x_tile = tl.load(x_rows[:, None] + offs_c[None, :].to(tl.int64) * stride_xc,
                         mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(grad_y_t, x_tile, input_precision=DOT_PRECISION, out_dtype=ACC)

    ptrs = grad_w_ptr + offs_co[:, None] * stride_go + offs_c[None, :] * stride_gc + i * stride_gi + j * stride_gj
    tl.store(ptrs, acc.to(grad_w_ptr.dtype.element_ty), mask=co_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=["ROWS", "KEYS", "OUT_W", "N", "W"])
def gsa_subsample_input_grad_kernel(
    grad_y_ptr, w_ptr, grad_x_ptr,
    ROWS, KEYS, OUT_W, N, W, C, SR,
    stride_wi, stride_wj, stride_wc, stride_wo,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[pixel (i, j) of each row's patch, c] = sum over co of grad_y[row, co] * w[co, c, i, j] for
    BLOCK_R rows, one tap (i, j) and BLOCK_C channels (program_id(1)); each pixel has exactly one writer."""
    # row blocks x taps on axis 0, the taps of a row block side by side: sr * sr grows past axis 1's 65535
    rows = (tl.program_id(0) // (SR * SR)) * BLOCK_R + tl.arange(0, BLOCK_R)
    tap = tl.program_id(0) % (SR * SR)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tap // SR
    j = tap % SR
    r_mask = rows < ROWS
    c_mask = offs_c < C
    w_tap = w_ptr + i * stride_wi + j * stride_wj

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for co_start in range(0, C, BLOCK_CO):
        offs_co = co_start + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < C
        grad_y = tl.load(grad_y_ptr + rows.to(tl.int64)[:, None] * C + offs_co[None, :],
                         mask=r_mask[:, None] & co_mask[None, :], other=0.0)
        w_tile = tl.load(w_tap + offs_co[:, None] * stride_wo + offs_c[None, :] * stride_wc,
                         mask=co_mask[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(grad_y, w_tile, input_precision=DOT_PRECISION, out_dtype=ACC)

    b, top_left = _patch_rows(rows, KEYS, OUT_W, W, SR)
    tokens = b * N + (top_left + i * W + j).to(tl.int64)
    tl.store(grad_x_ptr + tokens[:, None] * C + offs_c[None, :], acc.to(grad_x_ptr.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionTiles:
    block_m: int  # queries per block
    block_n: int  # keys per block
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class SubsampleTiles:
    block_r: int  # output rows (patches) per block
    block_c: int  # input channels per block
    block_co: int  # output channels per block
    num_warps: int
    num_stages: int


# The split dk/dv path aims for this many programs in the interpreter, which has no SMs to count; it is
# small so that the CPU tests run both the split and the direct path.
INTERPRETER_TARGET_PROGRAMS = 8
# Programs an SM the split aims for: 2 beside the dq kernel's (a program per query block); 4 where the
# dk/dv kernel computes dq too and is the whole backward, about as many as sm_90 holds of it at once
# (12 to 20 warps an SM at 4 warps a program, tests/triton_aot.py)
SPLIT_PROGRAMS_PER_SM = 2
WITH_DQ_PROGRAMS_PER_SM = 4


def attention_tiles(dtype: torch.dtype, head_dim: int, tokens: int, keys: int, backward: bool) -> AttentionTiles:
    """H100 tiles. 16-bit forward: 128 queries x 64 keys, the flash-attention sweet spot for tensor
    cores (4 warps up to head_dim 64, 8 at 128 where the accumulator doubles; 3 stages to pipeline the
    k/v loads, 2 at head_dim 128 for shared memory). Backward kernels hold k, v (or q, dO) and two
    accumulators, so 64 x 64. fp32 and fp64 (ieee precision) run on the FMA units, whose operands live
    in registers (``fma_rows``, ``fma_warps``): 32 keys a block; the forward's queries 64 up to head_dim
    32, the backward's 32 up to 64, each halved each time head_dim doubles past that. Where the M keys
    are one block, the backward's dk/dv kernel computes dq as well and takes half the queries a step
    (16-bit at 64 queries: ptxas spilled 152 bytes a thread for sm_80 at head_dim 64, and sm_90 held 8
    to 12 warps an SM, against 12 to 20 at 32; fp32 at 32 queries: 255 registers and spills for sm_90
    at head_dim 32 and 64, at 16 none, in 112-128; tests/triton_aot.py)."""
    wide = head_dim > 64
    if dtype in (torch.float16, torch.bfloat16):
        if backward:
            tiles = AttentionTiles(64, 64, 8 if wide else 4, 2)
        else:
            tiles = AttentionTiles(128, 64, 8 if wide else 4, 2 if wide else 3)
    else:
        block_d = next_pow2(head_dim)
        if backward:
            rows = fma_rows(block_d)
            tiles = AttentionTiles(rows, rows, fma_warps(rows, block_d), 1)
        else:
            rows = fma_rows(block_d, 64)
            tiles = AttentionTiles(rows, 32, fma_warps(rows, block_d), 2)
    block_m = max(16, tiles.block_m // 2) if backward and keys <= tiles.block_n else tiles.block_m
    return AttentionTiles(pow2_block(block_m, tokens), pow2_block(tiles.block_n, keys), tiles.num_warps,
                          tiles.num_stages)


def subsample_tiles(dtype: torch.dtype, chans: int, rows: int) -> SubsampleTiles:
    """64 patches x 128 output channels per GEMM tile, 64 input channels per step (16-bit); halved for
    fp32/fp64 on the FMA units. Twins' sub-sampled stages have C = 64..512, so the whole LayerNorm row
    is 1 to 4 output-channel chunks of one program (1 to 8 in fp32)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return SubsampleTiles(
        block_r=pow2_block(64 if half else 32, rows),
        block_c=pow2_block(64 if half else 32, chans),
        block_co=pow2_block(128 if half else 64, chans),
        num_warps=4,
        num_stages=3 if half else 2,
    )


def _dkdv_query_splits(base_programs: int, query_blocks: int, device: torch.device, programs_per_sm: int) -> int:
    """How many programs share one key block's query loop: enough to fill the GPU when there are few
    key blocks (M = 49 keys is one block per batch and head)."""
    if device.type == "cuda":
        target = programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_TARGET_PROGRAMS
    return max(1, min(query_blocks, target // base_programs))


def gsa_attention_forward_triton(q, kv, num_heads: int, scale: float):
    """(out (B, N, C), lse (B, heads, N)) for q (B, N, C) and kv (B, M, 2C), any strides."""
    batch, tokens, chans = q.shape
    keys = kv.shape[1]
    head_dim = chans // num_heads
    acc = accumulation_dtype(q.dtype)
    tiles = attention_tiles(q.dtype, head_dim, tokens, keys, backward=False)
    out = empty_output((batch, tokens, chans), q)
    lse = empty_output((batch, num_heads, tokens), q, dtype=acc)
    grid = (triton.cdiv(tokens, tiles.block_m) * batch * num_heads,)
    with launch_device(q):
        gsa_attention_forward_kernel[grid](
            q, kv, out, lse, scalar_arg(scale, q, acc), tokens, keys, chans, num_heads, head_dim,
            *q.stride(), *kv.stride(),
            ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=next_pow2(head_dim),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return out, lse


def gsa_attention_backward_triton(grad_out, q, kv, out, lse, num_heads: int, scale: float,
                                  query_splits: int | None = None):
    """(grad_q (B, N, C), grad_kv (B, M, 2C)). ``query_splits`` overrides the dk/dv split heuristic."""
    batch, tokens, chans = q.shape
    keys = kv.shape[1]
    head_dim = chans // num_heads
    acc = accumulation_dtype(q.dtype)
    tiles = attention_tiles(q.dtype, head_dim, tokens, keys, backward=True)
    lse = lse.contiguous()
    scale_arg = scalar_arg(scale, q, acc)
    common = dict(ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=tiles.block_m,
                  BLOCK_N=tiles.block_n, BLOCK_D=next_pow2(head_dim), num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)

    grad_q = empty_output((batch, tokens, chans), q)
    query_blocks = triton.cdiv(tokens, tiles.block_m)
    key_blocks = triton.cdiv(keys, tiles.block_n)
    with_dq = key_blocks == 1  # the dk/dv kernel computes dq and delta too
    # delta = rowsum(dO * O), from the dq kernel for the dk/dv kernel; lse stands in, unread, with_dq
    delta = lse if with_dq else empty_output((batch, num_heads, tokens), q, dtype=acc)
    if query_splits is None:
        query_splits = _dkdv_query_splits(batch * num_heads * key_blocks, query_blocks, q.device,
                                          WITH_DQ_PROGRAMS_PER_SM if with_dq else SPLIT_PROGRAMS_PER_SM)
    query_splits = max(1, min(query_splits, 65535))  # the splits are the grid's axis 1, at most 65535
    queries_per_split = triton.cdiv(query_blocks, query_splits) * tiles.block_m
    query_splits = triton.cdiv(tokens, queries_per_split)
    if query_splits == 1:
        grad_kv = target = empty_output((batch, keys, 2 * chans), q)
        stride_split = 0
    else:
        target = empty_output((query_splits, batch, keys, 2 * chans), q, dtype=acc)
        stride_split = target.stride(0)

    with launch_device(q):
        if not with_dq:
            # dq first: it also computes delta, which the dk/dv kernel reads
            gsa_attention_dq_kernel[(query_blocks * batch * num_heads,)](
                q, kv, out.contiguous(), grad_out, lse, scale_arg, delta, grad_q, tokens, keys, chans, num_heads,
                head_dim, *q.stride(), *kv.stride(), *grad_out.stride(), **common,
            )
        gsa_attention_dkdv_kernel[(key_blocks * batch * num_heads, query_splits)](
            q, kv, grad_out, lse, scale_arg, delta, grad_q, target, tokens, keys, chans, num_heads, head_dim,
            queries_per_split, *q.stride(), *kv.stride(), *grad_out.stride(),
            stride_split, keys * 2 * chans, 2 * chans, WITH_DQ=with_dq, **common,
        )
    if query_splits > 1:
        grad_kv = target.sum(dim=0).to(q.dtype)
    return grad_q, grad_kv


def _conv_weight_for_kernels(sr_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, sr, sr) -> (sr, sr, C_in, C_out) in the tokens' dtype: each tap's tile has its
    output channels contiguous (a weight-sized copy, not an activation-sized one)."""
    return sr_weight.to(dtype).permute(2, 3, 1, 0).contiguous()


def gsa_subsample_forward_triton(x, sr_weight, sr_bias, norm_weight, norm_bias, height: int, width: int,
                                 sr_ratio: int, eps: float):
    """(out (B, M, C), y (B, M, C) fp32, mean (B, M) fp32, rstd (B, M) fp32); fp64 for float64 x."""
    batch, _, chans = x.shape
    out_w = width // sr_ratio
    keys = (height // sr_ratio) * out_w
    rows = batch * keys
    acc = accumulation_dtype(x.dtype)
    tiles = subsample_tiles(x.dtype, chans, rows)
    weight = _conv_weight_for_kernels(sr_weight, x.dtype)
    # the kernel reads the 1-D parameters with unit strides
    sr_bias, norm_weight, norm_bias = (t.contiguous() for t in (sr_bias, norm_weight, norm_bias))
    out = empty_output((batch, keys, chans), x)
    y = empty_output((batch, keys, chans), x, dtype=acc)
    mean = empty_output((batch, keys), x, dtype=acc)
    rstd = empty_output((batch, keys), x, dtype=acc)
    with launch_device(x):
        gsa_subsample_forward_kernel[(triton.cdiv(rows, tiles.block_r),)](
            x, weight, sr_bias, norm_weight, norm_bias, out, y, mean, rstd, scalar_arg(eps, x, acc),
            rows, keys, out_w, width, chans, sr_ratio, *x.stride(), *weight.stride(),
            ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=tiles.block_r, BLOCK_K=tiles.block_c, BLOCK_CO=tiles.block_co,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return out, y, mean, rstd


def gsa_subsample_backward_triton(grad_out, x, sr_weight, norm_weight, y, mean, rstd, height: int, width: int,
                                  sr_ratio: int):
    """(grad_x, grad_sr_weight, grad_sr_bias, grad_norm_weight, grad_norm_bias)."""
    batch, tokens, chans = x.shape
    out_h, out_w = height // sr_ratio, width // sr_ratio
    keys = out_h * out_w
    rows = batch * keys
    acc = accumulation_dtype(x.dtype)
    tiles = subsample_tiles(x.dtype, chans, rows)
    common = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    geometry = (rows, keys, out_w)
    programs = triton.cdiv(rows, tiles.block_r)
    grad_y = empty_output((batch, keys, chans), x)
    partial = empty_output((programs, NORM_PARTIAL_SLOTS, chans), x, dtype=acc)
    grad_w = empty_output(sr_weight.shape, sr_weight)
    grad_x = empty_output((batch, tokens, chans), x)
    if height % sr_ratio or width % sr_ratio:
        # pixels past the last full patch are not read by the conv: their gradient is zero
        pixels = grad_x.view(batch, height, width, chans)
        pixels[:, out_h * sr_ratio:].zero_()
        pixels[:, :, out_w * sr_ratio:].zero_()
    weight = _conv_weight_for_kernels(sr_weight, x.dtype)
    c_blocks = triton.cdiv(chans, tiles.block_c)
    with launch_device(x):
        gsa_subsample_norm_backward_kernel[(programs,)](
            grad_out, y, mean, rstd, norm_weight.contiguous(), grad_y, partial, rows, keys, chans,
            *grad_out.stride(),
            ACC=TRITON_DTYPES[acc], BLOCK_R=tiles.block_r, BLOCK_CO=tiles.block_co, **common,
        )
        gsa_subsample_weight_grad_kernel[(sr_ratio * sr_ratio * c_blocks, triton.cdiv(chans, tiles.block_co))](
            grad_y, x, grad_w, *geometry, width, chans, sr_ratio, *x.stride(), *grad_w.stride(),
            ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=tiles.block_r, BLOCK_CO=tiles.block_co, BLOCK_C=tiles.block_c, **common,
        )
        gsa_subsample_input_grad_kernel[(programs * sr_ratio * sr_ratio, c_blocks)](
            grad_y, weight, grad_x, *geometry, tokens, width, chans, sr_ratio, *weight.stride(),
            ACC=TRITON_DTYPES[acc], DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=tiles.block_r, BLOCK_CO=tiles.block_co, BLOCK_C=tiles.block_c, **common,
        )
    sums = partial.sum(dim=0)
    # copies, never views of ``sums``: a custom op's outputs must not alias each other
    return (grad_x, grad_w, sums[2].to(sr_weight.dtype, copy=True), sums[0].to(norm_weight.dtype, copy=True),
            sums[1].to(norm_weight.dtype, copy=True))


# ----------------------------------------------------------------------------------------------
# Backend dispatch, torch.library registration, autograd
# ----------------------------------------------------------------------------------------------
def _attention_backend(q: torch.Tensor, num_heads: int, requested: str) -> str:
    return attention_backend(q, q.shape[2], num_heads, requested)


@autocast_neutral
def gsa_attention_forward(
    q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _attention_backend(q, num_heads, backend)
    if kernel == "triton":
        return gsa_attention_forward_triton(q, kv, num_heads, scale)
    if kernel == "cuda":
        out, lse = cuda_ops().gsa_attention_forward(q, kv, num_heads, scale)
        return out, lse
    return _attention_forward_reference(q, kv, num_heads, scale)


gsa_attention_forward_op = torch.library.custom_op("twins_kernels::gsa_attention_forward", gsa_attention_forward,
                                                   mutates_args=())


@gsa_attention_forward_op.register_fake
def _(q, kv, num_heads, scale, backend):
    batch, tokens, chans = q.shape
    lse = q.new_empty((batch, num_heads, tokens), dtype=accumulation_dtype(q.dtype))
    return q.new_empty((batch, tokens, chans)), lse


@autocast_neutral
def gsa_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    num_heads: int, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _attention_backend(q, num_heads, backend)
    if kernel == "triton":
        return gsa_attention_backward_triton(grad_out, q, kv, out, lse, num_heads, scale)
    if kernel == "cuda":
        grad_q, grad_kv = cuda_ops().gsa_attention_backward(grad_out, q, kv, out, lse, num_heads, scale)
        return grad_q, grad_kv
    return _attention_backward_reference(grad_out, q, kv, out, lse, num_heads, scale)


gsa_attention_backward_op = torch.library.custom_op("twins_kernels::gsa_attention_backward", gsa_attention_backward,
                                                    mutates_args=())


@gsa_attention_backward_op.register_fake
def _(grad_out, q, kv, out, lse, num_heads, scale, backend):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


run_gsa_attention_backward = kernel_backward_entry(gsa_attention_backward_op, gsa_attention_backward, "gsa_attention")


def _attention_setup_context(ctx, inputs, output):
    q, kv, num_heads, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, kv, out, lse)
    ctx.args = (num_heads, scale, call_choice(backend))


def _attention_backward(ctx, grad_out, _grad_lse):
    q, kv, out, lse = ctx.saved_tensors
    grad_q, grad_kv = run_gsa_attention_backward(grad_out, q, kv, out, lse, *ctx.args)
    return grad_q, grad_kv, None, None, None


run_gsa_attention_forward = kernel_op_entry(gsa_attention_forward_op, gsa_attention_forward, _attention_setup_context,
                                            _attention_backward)


def _subsample_map_size(x: torch.Tensor, height: int, width: int, sr_ratio: int,
                       map_size: torch.Tensor | None) -> tuple[int, int]:
    """The map gsa_subsample_forward runs on (map_size_of), which must hold one full patch."""
    height, width = map_size_of("gsa_subsample_forward", x.shape[1], height, width, map_size)
    if height < sr_ratio or width < sr_ratio:
        raise ValueError(f"size {height}x{width} is smaller than sr_ratio={sr_ratio}: the conv has no full patch")
    return height, width


@autocast_neutral
def gsa_subsample_forward(
    x: torch.Tensor, sr_weight: torch.Tensor, sr_bias: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor, height: int, width: int, sr_ratio: int, eps: float, backend: str,
    map_size: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    height, width = _subsample_map_size(x, height, width, sr_ratio, map_size)
    args = (x, sr_weight, sr_bias, norm_weight, norm_bias, height, width, sr_ratio, eps)
    if op_backend(x, backend) == "triton":
        return gsa_subsample_forward_triton(*args)
    return _subsample_forward_reference(*args)


gsa_subsample_forward_op = torch.library.custom_op("twins_kernels::gsa_subsample_forward", gsa_subsample_forward,
                                                   mutates_args=())


@gsa_subsample_forward_op.register_fake
def _(x, sr_weight, sr_bias, norm_weight, norm_bias, height, width, sr_ratio, eps, backend, map_size=None):
    batch, _, chans = x.shape
    keys = (height // sr_ratio) * (width // sr_ratio)
    acc = accumulation_dtype(x.dtype)
    return (x.new_empty((batch, keys, chans)), x.new_empty((batch, keys, chans), dtype=acc),
            x.new_empty((batch, keys), dtype=acc), x.new_empty((batch, keys), dtype=acc))


@autocast_neutral
def gsa_subsample_backward(
    grad_out: torch.Tensor, x: torch.Tensor, sr_weight: torch.Tensor, norm_weight: torch.Tensor,
    y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, height: int, width: int, sr_ratio: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_out, x, sr_weight, norm_weight, y, mean, rstd, height, width, sr_ratio)
    if op_backend(x, backend) == "triton":
        return gsa_subsample_backward_triton(*args)
    return _subsample_backward_reference(*args)


gsa_subsample_backward_op = torch.library.custom_op("twins_kernels::gsa_subsample_backward", gsa_subsample_backward,
                                                    mutates_args=())


@gsa_subsample_backward_op.register_fake
def _(grad_out, x, sr_weight, norm_weight, y, mean, rstd, height, width, sr_ratio, backend):
    chans = x.shape[2]
    return (x.new_empty(x.shape), sr_weight.new_empty(sr_weight.shape), sr_weight.new_empty((chans,)),
            norm_weight.new_empty((chans,)), norm_weight.new_empty((chans,)))


run_gsa_subsample_backward = kernel_backward_entry(gsa_subsample_backward_op, gsa_subsample_backward, "gsa_subsample")


def _subsample_setup_context(ctx, inputs, output):
    x, sr_weight, sr_bias, norm_weight, norm_bias, height, width, sr_ratio, eps, backend, map_size = inputs
    height, width = _subsample_map_size(x, height, width, sr_ratio, map_size)
    _, y, mean, rstd = output
    ctx.mark_non_differentiable(y, mean, rstd)
    ctx.save_for_backward(x, sr_weight, norm_weight, y, mean, rstd)
    ctx.args = (height, width, sr_ratio, call_choice(backend))


def _subsample_backward(ctx, grad_out, _grad_y, _grad_mean, _grad_rstd):
    grads = run_gsa_subsample_backward(grad_out, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None, None, None, None)


run_gsa_subsample_forward = kernel_op_entry(gsa_subsample_forward_op, gsa_subsample_forward, _subsample_setup_context,
                                            _subsample_backward)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def gsa_attention(q, kv, num_heads: int, scale: float | None = None, backend: str | None = None):
    """softmax(q k^T * scale) v per head: GSA's attention core.

    ``q`` (B, N, C) and ``kv`` (B, M, 2C) are the q and kv Linears' outputs (any strides): head h reads
    channels h*D:(h+1)*D of q, and of kv for keys and C + h*D : C + (h+1)*D for values, D = C / num_heads.
    ``scale`` defaults to D ** -0.5. Returns (B, N, C) in token order, heads concatenated.
    ``backend``: "auto" | "triton" | "cuda" | "torch", or None for the ambient choice; the kernel
    backends need D in 16..128 (``auto`` runs the reference outside it).
    """
    for name, t in (("q", q), ("kv", kv)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dims (B, L, channels), got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16 (float64 for checks)")
    batch, tokens, chans = q.shape
    if tokens < 1:
        raise ValueError(f"q has N={tokens} tokens; expected at least 1")
    if kv.shape[0] != batch or kv.shape[2] != 2 * chans or kv.shape[1] < 1:
        raise ValueError(f"kv has shape {tuple(kv.shape)}, expected (B={batch}, M >= 1, 2C={2 * chans})")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv has dtype {kv.dtype} but q has {q.dtype}; pass both in one dtype")
    if kv.device != q.device:
        raise ValueError(f"kv is on {kv.device} but q is on {q.device}; move both to one device")
    check_int(num_heads, "num_heads")
    if chans % num_heads != 0:
        raise ValueError(f"C={chans} is not divisible by num_heads={num_heads}")
    scale = (chans // num_heads) ** -0.5 if scale is None else check_float(scale, "scale")
    choice = call_choice(backend)
    if not torch.compiler.is_compiling():
        _attention_backend(q, num_heads, choice)  # fail here, naming what is wrong, not inside the op
    return run_gsa_attention_forward(q, kv, num_heads, scale, choice)[0]


def gsa_subsample(x, size, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio: int, eps: float = 1e-5,
                  backend: str | None = None):
    """GSA's key/value sub-sampling: LayerNorm(Conv2d(x, kernel = stride = sr_ratio)) on tokens.

    ``x`` (B, N, C) is an H x W map, ``size`` = (H, W); ``sr_weight`` (C, C, sr, sr) and ``sr_bias`` (C,)
    are the conv's, ``norm_weight``/``norm_bias`` (C,) and ``eps`` the LayerNorm's. Returns (B, M, C),
    M = (H // sr) * (W // sr): rows and columns past the last full patch are dropped, as the conv does.
    ``backend``: "auto" | "triton" | "cuda" | "torch", or None for the ambient choice ("cuda" runs the
    PyTorch reference for this part).
    """
    _, _, chans, height, width = check_tokens(x, size)
    _subsample_map_size(x, height, width, check_int(sr_ratio, "sr_ratio"), None)
    check_param(sr_weight, "sr_weight", (chans, chans, sr_ratio, sr_ratio), x)
    for name, t in (("sr_bias", sr_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_param(t, name, (chans,), x)
    eps = check_float(eps, "eps")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if backend is not None and not torch.compiler.is_compiling():
        resolve_backend(backend, x.device)  # fail here, naming what is missing, not deep inside the op
    return run_gsa_subsample_forward(x, sr_weight, sr_bias, norm_weight, norm_bias, height, width, sr_ratio,
                                    eps, call_choice(backend), traced_map_size(size))[0]
