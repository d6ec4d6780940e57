"""The CUDA attention kernels (csrc/attention.cuh with the LSA and GSA geometries) run on the CPU.

tests/cuda_emulation/emulate.h stands in for CUDA's execution model (blocks in turn, a block's threads as
std::threads meeting at a barrier in __syncthreads, __shared__ arrays as statics), so g++ builds the very
kernel code nvcc builds; the harness runs forward, dq and dk/dv on fp32 data and the results are
compared with the PyTorch references in float64. This checks index arithmetic, padding and masking,
shared-memory staging and the math on machines with no GPU; GPU-only behaviour is the GPU tests' job.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from twins_kernels.ops import gsa_attention_reference, lsa_reference

from parity import TOLERANCE, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (C++20) to build the emulated kernels")
    binary = tmp_path_factory.mktemp("emulation") / "attention_harness"
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-I", os.path.join(ROOT, "csrc"), "-o", str(binary),
                    os.path.join(ROOT, "tests", "cuda_emulation", "attention_harness.cpp")], check=True)
    return binary


def run_harness(harness, tmp_path, inputs, args, sizes):
    (tmp_path / "in.bin").write_bytes(b"".join(t.float().contiguous().numpy().tobytes() for t in inputs))
    subprocess.run([str(harness), *map(str, args[:1]), tmp_path / "in.bin", tmp_path / "out.bin", *map(str, args[1:])],
                   check=True, timeout=600)
    flat = np.fromfile(tmp_path / "out.bin", dtype=np.float32)
    assert flat.size == sum(sizes)
    return [torch.from_numpy(part.copy()) for part in np.split(flat, np.cumsum(sizes)[:-1])]


@pytest.mark.parametrize("batch,height,width,heads,head_dim,ws", [
    pytest.param(2, 13, 17, 2, 32, 7, id="13x17-ws7-padded"),
    pytest.param(1, 14, 14, 1, 64, 7, id="14x14-ws7-exact"),
    pytest.param(1, 9, 10, 2, 16, 9, id="9x10-ws9-81-slots"),
    pytest.param(1, 5, 3, 1, 128, 4, id="5x3-ws4-hd128"),
])
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
def test_emulated_lsa_kernels_match_the_reference(harness, tmp_path, batch, height, width, heads, head_dim, ws,
                                                  pad_mode):
    chans = heads * head_dim
    tokens = height * width
    qkv = torch.randn(batch, tokens, 3 * chans)
    bias = torch.randn(3 * chans)
    grad_out = torch.randn(batch, tokens, chans)
    scale = head_dim ** -0.5
    windows = -(-height // ws) * -(-width // ws)
    blocks = batch * windows * heads
    out, lse, grad_qkv, pad_grad = run_harness(
        harness, tmp_path, [qkv, bias, grad_out],
        ["lsa", batch, height, width, chans, heads, ws, repr(scale), int(pad_mode == "mask")],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * 3 * chans, blocks * ws * ws * 2 * head_dim])

    qkv64, bias64 = qkv.double().requires_grad_(), bias.double().requires_grad_()
    expected = lsa_reference(qkv64, bias64, (height, width), heads, ws, scale, pad_mode)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= TOL
    assert rel_err(grad_qkv.view(batch, tokens, 3 * chans), qkv64.grad) <= TOL
    # the host code's reduction of the padded keys' share: per head, k and v halves of the bias
    share = pad_grad.view(-1, heads, ws * ws, 2, head_dim).sum((0, 2)).permute(1, 0, 2).reshape(-1)
    grad_bias = torch.cat([torch.zeros(chans), share])
    if bias64.grad.norm() > 0:
        assert rel_err(grad_bias, bias64.grad) <= TOL
    else:
        assert grad_bias.abs().max() == 0
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("batch,tokens,keys,heads,head_dim", [
    pytest.param(2, 150, 40, 2, 32, id="N150-M40"),  # two query tiles, keys past one staging tile
    pytest.param(1, 20, 1, 1, 64, id="M1"),
    pytest.param(1, 130, 130, 1, 16, id="sr1-N130"),
    pytest.param(1, 33, 7, 2, 128, id="hd128"),
])
def test_emulated_gsa_kernels_match_the_reference(harness, tmp_path, batch, tokens, keys, heads, head_dim):
    chans = heads * head_dim
    q = torch.randn(batch, tokens, chans)
    kv = torch.randn(batch, keys, 2 * chans)
    grad_out = torch.randn(batch, tokens, chans)
    scale = head_dim ** -0.5
    out, lse, grad_q, grad_kv = run_harness(
        harness, tmp_path, [q, kv, grad_out], ["gsa", batch, tokens, keys, chans, heads, repr(scale)],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * chans, batch * keys * 2 * chans])

    q64, kv64 = q.double().requires_grad_(), kv.double().requires_grad_()
    expected = gsa_attention_reference(q64, kv64, heads, scale)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= TOL
    assert rel_err(grad_kv.view(batch, keys, 2 * chans), kv64.grad) <= TOL
    if keys > 1:  # with one key the output does not depend on q: its gradient is rounding noise
        assert rel_err(grad_q.view(batch, tokens, chans), q64.grad) <= TOL
    else:
        assert grad_q.abs().max() <= TOL
    expected_lse = torch.logsumexp(scale * torch.einsum("bnhd,bmhd->bhnm", q64.view(batch, tokens, heads, -1),
                                                        kv64[..., :chans].reshape(batch, keys, heads, -1)), -1)
    assert rel_err(lse.view(batch, heads, tokens), expected_lse) <= TOL
