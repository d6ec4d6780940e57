"""The CUDA extension's host code on CPU tensors (cuda_host_emulation.py), beyond the cuda backend's own tests
(which run that way without a GPU): FusedLSA, FusedGSA and FusedPEG with backend="cuda" against timm's modules
on both kernel families, strided inputs, GSA's split of its dk/dv queries by the GPU's size, and the
extension's ops called directly: an empty batch, bad input.

test_cuda_emulation.py checks the kernels with host code of its own (its harnesses set up the kernels'
arguments as csrc/ does); here the arguments come from csrc/ itself, as on a GPU, where the cuda backend's
tests run all of this for real.
"""
import re

import pytest
import torch
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, PosConv

from twins_kernels import FusedGSA, FusedLSA, FusedPEG
from twins_kernels.ops import gsa_attention, gsa_attention_reference, lsa, lsa_reference, peg, peg_reference

from conftest import HAS_GPU
from cuda_host_emulation import DEVICE_CODE, KERNELS_AND_DTYPES
from parity import check_module_parity, check_op_against_reference, make_tokens, strided_with_nans

pytestmark = pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the cuda backend's tests run the extension")


@pytest.fixture
def cuda_backend(emulated_cuda_backend, monkeypatch, kernels):
    """The package's cuda backend on CPU tensors (conftest.py), on ``kernels``' code version."""
    monkeypatch.setenv("TWINS_KERNELS_EMULATION_DEVICE_CODE", DEVICE_CODE[kernels])


def fused(cls):
    return lambda module: cls.from_module(module, backend="cuda")


@KERNELS_AND_DTYPES
@pytest.mark.usefixtures("cuda_backend")
def test_modules_on_the_cuda_backend_match_timm(kernels, dtype):
    """A 13 x 17 map of non-contiguous tokens: LSA's windows padded on both sides (the padded keys' share of
    the bias gradient), GSA's sub-sampling flooring it (sr 4) and plain global attention (sr 1), PEG."""
    x = make_tokens(2, 13, 17, 64, dtype, "cpu", contiguous=False)
    check_module_parity(LocallyGroupedAttn(64, 2, ws=7), fused(FusedLSA), x, (13, 17), dtype)
    for sr_ratio in (4, 1):
        check_module_parity(GlobalSubSampleAttn(64, 2, sr_ratio=sr_ratio), fused(FusedGSA), x, (13, 17), dtype)
    check_module_parity(PosConv(64, 64), fused(FusedPEG), x, (13, 17), dtype)


@KERNELS_AND_DTYPES
@pytest.mark.usefixtures("cuda_backend")
def test_ops_on_the_cuda_backend_read_strided_inputs(kernels, dtype):
    """qkv, q, kv and x with strided channels, LSA's bias in fp32 with 16-bit qkv (what autocast hands), a
    stride between its elements and NaN between them; LSA in mask mode on a map padded on the right only."""
    tokens = 14 * 11
    qkv = torch.randn(2, 6 * 64, tokens).to(dtype).transpose(1, 2)[..., ::2]
    bias = strided_with_nans(torch.randn(3 * 64).to(dtype).float())  # values the kernels' dtype holds
    check_op_against_reference(lambda q, b: lsa(q, b, (14, 11), 2, 7, pad_mode="mask", backend="cuda"),
                               lambda q, b: lsa_reference(q, b, (14, 11), 2, 7, pad_mode="mask"), [qkv, bias], dtype)
    q = torch.randn(2, 2 * 64, tokens).to(dtype).transpose(1, 2)[..., ::2]
    kv = torch.randn(2, 4 * 64, 12).to(dtype).transpose(1, 2)[..., 1::2]
    check_op_against_reference(lambda q, kv: gsa_attention(q, kv, 2, backend="cuda"),
                               lambda q, kv: gsa_attention_reference(q, kv, 2), [q, kv], dtype)
    x = make_tokens(2, 14, 11, 40, dtype, "cpu", contiguous=False)
    weight, conv_bias = torch.randn(40, 1, 3, 3).to(dtype), torch.randn(40).to(dtype)
    check_op_against_reference(lambda x, w, b: peg(x, w, b, (14, 11), backend="cuda"),
                               lambda x, w, b: peg_reference(x, w, b, (14, 11)), [x, weight, conv_bias], dtype)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("kernels,dtype", [("mma", torch.bfloat16), ("scalar", torch.float32)],
                         ids=["mma-bf16", "scalar-fp32"])
@pytest.mark.usefixtures("cuda_backend")
def test_gsa_backward_splits_its_queries_by_the_gpus_size(kernels, dtype, sms, monkeypatch):
    """gsa.cu splits a key block's dk/dv queries across blocks to fill the GPU (2 blocks an SM) and sums their
    fp32 shares after: with 132 SMs the 221 queries of the two key blocks (a key tile a head) are split, with
    1 they are not."""
    monkeypatch.setenv("TWINS_KERNELS_EMULATION_SMS", str(sms))
    q, kv = torch.randn(1, 221, 64).to(dtype), torch.randn(1, 7, 128).to(dtype)
    check_op_against_reference(lambda q, kv: gsa_attention(q, kv, 2, backend="cuda"),
                               lambda q, kv: gsa_attention_reference(q, kv, 2), [q, kv], dtype)


def test_an_empty_batch_launches_nothing(emulated_cuda_ops):
    """A launch of no blocks is one the GPU refuses: the ops return empty outputs (and zero sums) instead."""
    qkv, bias = torch.randn(0, 12, 96), torch.randn(96)
    out, lse = emulated_cuda_ops.lsa_forward(qkv, bias, 3, 4, 7, 2, 0.25, False)
    assert out.shape == (0, 12, 32) and lse.shape == (0, 2, 12)
    grad_qkv, grad_bias = emulated_cuda_ops.lsa_backward(out, qkv, bias, out, lse, 3, 4, 7, 2, 0.25, False)
    assert grad_qkv.shape == qkv.shape and torch.equal(grad_bias, torch.zeros(96))
    q, kv = torch.randn(0, 12, 32), torch.randn(0, 5, 64)
    out, lse = emulated_cuda_ops.gsa_attention_forward(q, kv, 2, 0.25)
    grad_q, grad_kv = emulated_cuda_ops.gsa_attention_backward(out, q, kv, out, lse, 2, 0.25)
    assert grad_q.shape == q.shape and torch.equal(grad_kv, torch.zeros_like(kv))
    x = torch.randn(0, 12, 32)
    assert emulated_cuda_ops.peg_conv3x3(x, torch.randn(32, 1, 3, 3), None, 3, 4, False).shape == x.shape
    assert torch.equal(emulated_cuda_ops.peg_weight_grad(x, x, 3, 4), torch.zeros(10, 32))


BAD_CALLS = {
    "lsa-ws-17": (lambda ops: ops.lsa_forward(torch.randn(1, 12, 96), torch.randn(96), 3, 4, 17, 2, 0.25, False),
                  "ws must be in 2..16, got 17"),
    "lsa-head-dim-8": (lambda ops: ops.lsa_forward(torch.randn(1, 12, 48), torch.randn(48), 3, 4, 7, 2, 0.25, False),
                       "head_dim must be in 16..128, got 8"),
    "lsa-tokens": (lambda ops: ops.lsa_forward(torch.randn(1, 12, 96), torch.randn(96), 3, 5, 7, 2, 0.25, False),
                   "qkv has N=12, expected H*W=15"),
    "lsa-fp64": (lambda ops: ops.lsa_forward(torch.randn(1, 12, 96, dtype=torch.float64),
                                             torch.randn(96, dtype=torch.float64), 3, 4, 7, 2, 0.25, False),
                 "supports fp32, fp16 and bf16, got Double"),
    "gsa-kv-channels": (lambda ops: ops.gsa_attention_forward(torch.randn(1, 12, 32), torch.randn(1, 5, 32), 2, 0.25),
                        "kv has shape [1, 5, 32], expected (1, M, 64)"),
    "peg-weight": (lambda ops: ops.peg_conv3x3(torch.randn(1, 12, 32), torch.randn(16, 1, 3, 3), None, 3, 4, False),
                   "weight must be (C, 1, 3, 3) with C=32"),
}


@pytest.mark.parametrize("call,message", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_the_extension_rejects_bad_input_naming_it(emulated_cuda_ops, call, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(emulated_cuda_ops)
