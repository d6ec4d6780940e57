"""The CUDA kernels (csrc/attention.cuh and attention_mma.cuh with the LSA and GSA geometries,
csrc/peg_kernels.cuh) run on the CPU.

tests/cuda_emulation/emulate.h stands in for CUDA's execution model (blocks in turn, a block's threads as
std::threads meeting at a barrier in __syncthreads, __shared__ arrays as statics, warps exchanging
registers for __shfl_xor_sync and mma.sync), so g++ builds the very kernel code nvcc builds; the harnesses
run forward and backward in fp32, fp16 and bf16 (c10::Half and c10::BFloat16, the types the extension
dispatches to), the attention with both kernel families (scalar: every dtype; mma, the tensor-core kernels:
fp16 and bf16), and the results are compared with the PyTorch references in float64 on the same (rounded)
inputs. This checks index arithmetic, padding and masking, shared-memory staging, the mma fragment layouts,
the math and the 16-bit loads and stores on machines with no GPU; GPU-only behaviour is the GPU tests' job.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from twins_kernels.ops import gsa_attention_reference, lsa_reference, peg_reference

from parity import DTYPE_IDS, TOLERANCE, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
# the attention kernels the extension runs per dtype: scalar for every dtype (fp32's only path), mma for
# fp16/bf16 on compute capability 8.0+
KERNELS_AND_DTYPES = pytest.mark.parametrize("kernels,dtype", [
    pytest.param(kernels, dtype, id=f"{kernels}-{DTYPE_IDS[dtype]}")
    for kernels, dtype in [("scalar", torch.float32), ("scalar", torch.float16), ("scalar", torch.bfloat16),
                           ("mma", torch.float16), ("mma", torch.bfloat16)]])


def build(tmp_path_factory, name: str):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (C++20) to build the emulated kernels")
    from torch.utils.cpp_extension import include_paths

    binary = tmp_path_factory.mktemp("emulation") / name
    includes = [flag for path in [os.path.join(ROOT, "csrc"), *include_paths()] for flag in ("-I", path)]
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", *includes, "-o", str(binary),
                    os.path.join(ROOT, "tests", "cuda_emulation", f"{name}.cpp")], check=True)
    return binary


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build(tmp_path_factory, "attention_harness")


@pytest.fixture(scope="module")
def peg_harness(tmp_path_factory):
    return build(tmp_path_factory, "peg_harness")


def run_harness(harness, tmp_path, inputs, mode, args, sizes):
    """Run ``harness MODE... IN OUT ARGS...`` on ``inputs`` (``mode``: what comes before the files, ending
    with the dtype name, or the kernel family); returns its fp32 outputs split by ``sizes``."""
    (tmp_path / "in.bin").write_bytes(b"".join(t.float().contiguous().numpy().tobytes() for t in inputs))
    subprocess.run([str(harness), *mode, tmp_path / "in.bin", tmp_path / "out.bin", *map(str, args)],
                   check=True, timeout=600)
    flat = np.fromfile(tmp_path / "out.bin", dtype=np.float32)
    assert flat.size == sum(sizes)
    return [torch.from_numpy(part.copy()) for part in np.split(flat, np.cumsum(sizes)[:-1])]


def randn(*shape, dtype):
    """fp32 values that ``dtype`` holds exactly: the kernels and the float64 reference see the same numbers."""
    return torch.randn(*shape).to(dtype).float()


@pytest.mark.parametrize("batch,height,width,heads,head_dim,ws", [
    pytest.param(2, 13, 17, 2, 32, 7, id="13x17-ws7-padded"),
    pytest.param(1, 14, 14, 1, 64, 7, id="14x14-ws7-exact"),
    pytest.param(1, 9, 10, 2, 16, 9, id="9x10-ws9-81-slots"),
    pytest.param(1, 5, 3, 1, 128, 4, id="5x3-ws4-hd128"),
    # 256 slots, 4 query blocks of the mma kernels; rows 10..15 padded: in mask mode a whole key tile is excluded
    pytest.param(1, 10, 16, 1, 48, 16, id="10x16-ws16-hd48"),
    # rows of 3C = 120 values: every other token's row is not 16-byte aligned (element-wise staging)
    pytest.param(1, 6, 5, 2, 20, 3, id="6x5-ws3-hd20-unaligned"),
])
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@KERNELS_AND_DTYPES
def test_emulated_lsa_kernels_match_the_reference(harness, tmp_path, batch, height, width, heads, head_dim, ws,
                                                  pad_mode, kernels, dtype):
    tol = TOLERANCE[dtype]
    chans = heads * head_dim
    tokens = height * width
    qkv = randn(batch, tokens, 3 * chans, dtype=dtype)
    bias = randn(3 * chans, dtype=dtype)
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    scale = head_dim ** -0.5
    window_heads = batch * -(-height // ws) * -(-width // ws) * heads
    out, lse, grad_qkv, pad_grad = run_harness(
        harness, tmp_path, [qkv, bias, grad_out], ["lsa", DTYPE_IDS[dtype], kernels],
        [batch, height, width, chans, heads, ws, repr(scale), int(pad_mode == "mask")],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * 3 * chans,
         window_heads * ws * ws * 2 * head_dim])

    qkv64, bias64 = qkv.double().requires_grad_(), bias.double().requires_grad_()
    expected = lsa_reference(qkv64, bias64, (height, width), heads, ws, scale, pad_mode)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_qkv.view(batch, tokens, 3 * chans), qkv64.grad) <= tol
    # the host code's reduction of the padded keys' share: per head, k and v halves of the bias
    share = pad_grad.view(-1, heads, ws * ws, 2, head_dim).sum((0, 2)).permute(1, 0, 2).reshape(-1)
    grad_bias = torch.cat([torch.zeros(chans), share])
    if bias64.grad.norm() > 0:
        assert rel_err(grad_bias, bias64.grad) <= tol
    else:
        assert grad_bias.abs().max() == 0
    assert torch.isfinite(lse).all()


# query_splits: key blocks sharing a key tile's queries (gsa.cu picks it from the GPU's SM count)
@pytest.mark.parametrize("batch,tokens,keys,heads,head_dim,query_splits", [
    pytest.param(2, 150, 40, 2, 32, 1, id="N150-M40"),  # several query blocks, keys past one staging tile
    pytest.param(2, 150, 40, 2, 32, 2, id="N150-M40-2-splits"),  # splits of 128 and 22 queries
    pytest.param(1, 20, 1, 1, 64, 1, id="M1"),
    pytest.param(1, 130, 130, 1, 16, 3, id="sr1-N130-3-splits"),  # online softmax over 3 key tiles
    pytest.param(1, 33, 7, 2, 128, 1, id="hd128"),
    pytest.param(1, 70, 9, 1, 36, 1, id="hd36-unaligned"),  # rows of 36 (q) and 72 (kv) values
])
@KERNELS_AND_DTYPES
def test_emulated_gsa_kernels_match_the_reference(harness, tmp_path, batch, tokens, keys, heads, head_dim,
                                                  query_splits, kernels, dtype):
    tol = TOLERANCE[dtype]
    chans = heads * head_dim
    q = randn(batch, tokens, chans, dtype=dtype)
    kv = randn(batch, keys, 2 * chans, dtype=dtype)
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    scale = head_dim ** -0.5
    out, lse, grad_q, grad_kv = run_harness(
        harness, tmp_path, [q, kv, grad_out], ["gsa", DTYPE_IDS[dtype], kernels],
        [batch, tokens, keys, chans, heads, repr(scale), query_splits],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * chans, batch * keys * 2 * chans])

    q64, kv64 = q.double().requires_grad_(), kv.double().requires_grad_()
    expected = gsa_attention_reference(q64, kv64, heads, scale)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_kv.view(batch, keys, 2 * chans), kv64.grad) <= tol
    if keys > 1:
        assert rel_err(grad_q.view(batch, tokens, chans), q64.grad) <= tol
    else:  # with one key the output does not depend on q: its gradient is rounding noise (of out, in 16 bits)
        assert torch.isfinite(grad_q).all() and grad_q.norm() <= tol * grad_kv.norm()
    expected_lse = torch.logsumexp(scale * torch.einsum("bnhd,bmhd->bhnm", q64.view(batch, tokens, heads, -1),
                                                        kv64[..., :chans].reshape(batch, keys, heads, -1)), -1)
    assert rel_err(lse.view(batch, heads, tokens), expected_lse) <= tol


@pytest.mark.parametrize("batch,height,width,chans", [
    pytest.param(2, 5, 7, 40, id="5x7-C40"),
    pytest.param(1, 1, 9, 300, id="1x9-C300-two-blocks"),
    pytest.param(3, 4, 1, 33, id="W1"),
])
@DTYPES
def test_emulated_peg_kernels_match_the_reference(peg_harness, tmp_path, batch, height, width, chans, dtype):
    tol = TOLERANCE[dtype]
    tokens = height * width
    x = randn(batch, tokens, chans, dtype=dtype)
    weight = randn(chans, 1, 3, 3, dtype=dtype)  # a module's parameters in dtype, widened by peg.cu
    bias = randn(chans, dtype=dtype)
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    out, grad_x, sums = run_harness(peg_harness, tmp_path, [x, weight.reshape(chans, 9), bias, grad_out],
                                    [DTYPE_IDS[dtype]], [batch, height, width, chans],
                                    [batch * tokens * chans] * 2 + [10 * chans])
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    expected = peg_reference(x64, w64, b64, (height, width))
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_x.view(batch, tokens, chans), x64.grad) <= tol
    sums = sums.view(10, chans)
    assert rel_err(sums[:9].t().reshape(chans, 1, 3, 3), w64.grad) <= tol
    assert rel_err(sums[9], b64.grad) <= tol
