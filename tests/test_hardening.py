"""Hardening: fuzzed parity, NaN propagation, 64-bit offsets, distributed training."""
import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twins_kernels
from twins_kernels.ops import peg, peg_reference

from conftest import HAS_GPU, KERNEL_DEVICE, requires_gpu
from parity import TOLERANCE, make_tokens, rel_err

# CPU examples run in the Triton interpreter: keep the budget to seconds per property
FUZZ = settings(max_examples=60 if HAS_GPU else 10, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])


@FUZZ
@given(batch=st.integers(1, 3), height=st.integers(1, 12), width=st.integers(1, 12), chans=st.integers(1, 80),
       dtype=st.sampled_from(FUZZ_DTYPES), contiguous=st.booleans())
def test_fuzzed_peg_matches_reference(batch, height, width, chans, dtype, contiguous):
    x = make_tokens(batch, height, width, chans, dtype, KERNEL_DEVICE, contiguous=contiguous).requires_grad_()
    weight = torch.randn(chans, 1, 3, 3, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(chans, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    expected = peg_reference(x64, w64, b64, (height, width))
    grad = torch.randn_like(expected)
    expected.backward(grad)
    with twins_kernels.ops.poisoned_outputs():
        out = peg(x, weight, bias, (height, width), backend="triton")
        out.backward(grad.to(dtype))
    for name, actual, reference in [("out", out, expected), ("grad_x", x.grad, x64.grad),
                                    ("grad_w", weight.grad, w64.grad), ("grad_b", bias.grad, b64.grad)]:
        assert rel_err(actual, reference) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_reference(special):
    x = make_tokens(1, 6, 7, 16, torch.float32, KERNEL_DEVICE)
    x[0, 17, 3] = special
    weight = torch.randn(16, 1, 3, 3, device=KERNEL_DEVICE)
    bias = torch.randn(16, device=KERNEL_DEVICE)
    expected = peg_reference(x, weight, bias, (6, 7))
    actual = peg(x, weight, bias, (6, 7), backend="triton")
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite])


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_peg_offsets_past_2_to_the_31(backend):
    """B*N*C = 3 * 512*512 * 4096 > 2^31 elements: offsets must be 64-bit."""
    status = twins_kernels.backend.backend_status(backend, "cuda")
    if not status.available:
        pytest.skip(status.reason)
    batch, height, width, chans = 3, 512, 512, 4096
    x = torch.randn(batch, height * width, chans, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    weight = torch.randn(chans, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(chans, device="cuda", dtype=torch.bfloat16)
    out = peg(x, weight, bias, (height, width), backend=backend)
    last = out[-1:].float()
    del out
    expected = peg_reference(x[-1:].float(), weight.float(), bias.float(), (height, width))
    assert rel_err(last, expected) <= TOLERANCE[torch.bfloat16]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step(rank: int, world: int, port: int, results):
    import timm
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        plain = timm.create_model("twins_svt_small", pretrained=False, num_classes=10)
        fused = copy.deepcopy(plain)
        twins_kernels.patch_model(fused, backend="triton")
        torch.manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(1, 3, 64, 64)
        target = torch.randint(0, 10, (1,))
        grads = []
        for model in (plain, fused):
            ddp = DDP(model)
            torch.nn.functional.cross_entropy(ddp(x), target).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        worst = max(rel_err(grads[1][n], grads[0][n]) for n in grads[0])
        results[rank] = worst
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_patched_matches_unpatched():
    """Two gloo ranks on the CPU: the patched model's all-reduced gradients equal the unpatched model's."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_step, args=(2, _free_port(), results), nprocs=2, join=True)
        worst = dict(results)
    assert set(worst) == {0, 1}
    assert all(err <= 10 * TOLERANCE[torch.float32] for err in worst.values()), worst
