"""Hardening: fuzzed parity, NaN propagation, 64-bit offsets, activation checkpointing, distributed training."""
import copy
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.attention
import torch.utils.checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.twins import PosConv

import twins_kernels
from twins_kernels.ops import (
    gsa_attention,
    gsa_attention_reference,
    gsa_subsample,
    gsa_subsample_reference,
    lsa,
    lsa_reference,
    peg,
    peg_reference,
    poisoned_outputs,
)
from twins_kernels.ops.lsa import PAD_MODES
from twins_kernels.testing import ieee_fp32, module_parity_errors

from conftest import (HAS_GPU, KERNEL_DEVICE, KERNEL_DTYPES, SHALLOW, SMALL_FUSED_KINDS, large_gpu_memory,
                      requires_concurrent_programs, requires_gpu, skip_cuda_unless_available, skip_unless_available,
                      small_fused_module)
from parity import TOLERANCE, check_op_against_reference, make_tokens, outermost_past_int32, rel_err

# CPU examples run in the Triton interpreter: keep the budget to seconds per property
FUZZ = settings(max_examples=60 if HAS_GPU else 10, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_BACKENDS = ["triton"] + (["cuda"] if HAS_GPU and twins_kernels.cuda_extension_built() else [])


def _op_and_fp32_inputs(op: str, backend: str):
    def tokens(*shape):
        return torch.randn(*shape, device=KERNEL_DEVICE)

    # a batch of 3: laid out past 2^31 along the batch, its stride fits 32 bits and the last image's offset not
    size = (5, 6)
    if op == "peg":
        return lambda *a: peg(*a, size, backend=backend), [tokens(3, 30, 16), tokens(16, 1, 3, 3), tokens(16)]
    if op == "lsa":
        return lambda *a: lsa(*a, size, 2, 4, backend=backend), [tokens(3, 30, 96), tokens(96)]
    if op == "gsa_attention":  # 70 keys: several key blocks, the backward's separate dq kernel
        return lambda *a: gsa_attention(*a, 2, backend=backend), [tokens(3, 30, 32), tokens(3, 70, 64)]
    return (lambda x, *a: gsa_subsample(x, size, *a, 2, backend=backend),
            [tokens(3, 30, 16), tokens(16, 16, 2, 2), tokens(16), tokens(16), tokens(16)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["peg", "lsa", "gsa_attention", "gsa_subsample"])
def test_ops_compute_in_their_inputs_dtype_under_autocast(op, backend):
    """Autocast does not reach into an op, forward or backward: fp32 inputs give the fp32 results they give
    outside it, on every backend, the torch backend's PyTorch convs and matmuls included (their outputs
    in autocast's dtype would disagree with the kernels' and the fakes', and PEG's conv backward failed on
    the mixed dtypes). The modules follow autocast where timm's do (test_peg.py)."""
    torch.manual_seed(0)
    fn, inputs = _op_and_fp32_inputs(op, backend)
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16, enabled=enabled):
            out = fn(*leaves)
            out.square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for plain, autocast in zip(*results):
        assert autocast.dtype == torch.float32 and rel_err(autocast, plain) <= 1e-6


@FUZZ
@given(batch=st.integers(1, 3), height=st.integers(1, 12), width=st.integers(1, 12), chans=st.integers(1, 80),
       dtype=st.sampled_from(KERNEL_DTYPES), contiguous=st.booleans(), backend=st.sampled_from(FUZZ_BACKENDS))
def test_fuzzed_peg_matches_reference(batch, height, width, chans, dtype, contiguous, backend):
    x = make_tokens(batch, height, width, chans, dtype, KERNEL_DEVICE, contiguous=contiguous)
    weight = torch.randn(chans, 1, 3, 3, device=KERNEL_DEVICE, dtype=dtype)
    bias = torch.randn(chans, device=KERNEL_DEVICE, dtype=dtype)
    size = (height, width)
    check_op_against_reference(lambda *a: peg(*a, size, backend=backend),
                               lambda *a: peg_reference(*a, size), [x, weight, bias], dtype)


@FUZZ
@given(batch=st.integers(1, 2), height=st.integers(1, 11), width=st.integers(1, 11), ws=st.integers(2, 8),
       heads=st.integers(1, 2), head_dim=st.sampled_from([16, 32]), pad_mode=st.sampled_from(PAD_MODES),
       dtype=st.sampled_from(KERNEL_DTYPES), contiguous=st.booleans(), backend=st.sampled_from(FUZZ_BACKENDS))
def test_fuzzed_lsa_matches_reference(batch, height, width, ws, heads, head_dim, pad_mode, dtype, contiguous,
                                      backend):
    chans = heads * head_dim
    qkv = make_tokens(batch, height, width, 3 * chans, dtype, KERNEL_DEVICE, contiguous=contiguous)
    bias = torch.randn(3 * chans, device=KERNEL_DEVICE, dtype=dtype)
    size = (height, width)
    check_op_against_reference(lambda q, b: lsa(q, b, size, heads, ws, pad_mode=pad_mode, backend=backend),
                               lambda q, b: lsa_reference(q, b, size, heads, ws, pad_mode=pad_mode),
                               [qkv, bias], dtype)


@FUZZ
@given(batch=st.integers(1, 2), tokens=st.integers(1, 70), keys=st.integers(1, 40), heads=st.integers(1, 2),
       head_dim=st.sampled_from([16, 32, 64]), dtype=st.sampled_from(KERNEL_DTYPES), contiguous=st.booleans(),
       backend=st.sampled_from(FUZZ_BACKENDS))
def test_fuzzed_gsa_attention_matches_reference(batch, tokens, keys, heads, head_dim, dtype, contiguous, backend):
    chans = heads * head_dim
    q = make_tokens(batch, tokens, 1, chans, dtype, KERNEL_DEVICE, contiguous=contiguous)
    kv = make_tokens(batch, keys, 1, 2 * chans, dtype, KERNEL_DEVICE, contiguous=contiguous)
    check_op_against_reference(lambda q, kv: gsa_attention(q, kv, heads, backend=backend),
                               lambda q, kv: gsa_attention_reference(q, kv, heads), [q, kv], dtype,
                               zero_grad_inputs=(0,) if keys == 1 else ())  # one key: out does not depend on q


@FUZZ
@given(batch=st.integers(1, 2), height=st.integers(1, 13), width=st.integers(1, 13), sr=st.integers(1, 5),
       chans=st.integers(4, 48), dtype=st.sampled_from(KERNEL_DTYPES), contiguous=st.booleans())
def test_fuzzed_gsa_subsample_matches_reference(batch, height, width, sr, chans, dtype, contiguous):
    # C >= 4: over 1 or 2 channels a LayerNorm's output is (nearly) constant and its input gradient is
    # rounding noise on both sides
    if height < sr or width < sr:
        height, width = max(height, sr), max(width, sr)  # at least one patch
    x = make_tokens(batch, height, width, chans, dtype, KERNEL_DEVICE, contiguous=contiguous)
    params = [torch.randn(chans, chans, sr, sr, device=KERNEL_DEVICE, dtype=dtype) / (chans * sr),
              torch.randn(chans, device=KERNEL_DEVICE, dtype=dtype),
              1 + 0.1 * torch.randn(chans, device=KERNEL_DEVICE, dtype=dtype),
              torch.randn(chans, device=KERNEL_DEVICE, dtype=dtype)]
    size = (height, width)
    check_op_against_reference(lambda *a: gsa_subsample(a[0], size, *a[1:], sr, backend="triton"),
                               lambda *a: gsa_subsample_reference(a[0], size, *a[1:], sr), [x, *params], dtype)


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


def _lsa_case(x):
    bias = torch.randn(x.shape[-1], device=x.device)
    return (lambda t: lsa(t, bias, (6, 7), 2, 4, backend="triton"), lambda t: lsa_reference(t, bias, (6, 7), 2, 4))


def _gsa_case(x):
    kv = torch.randn(x.shape[0], 5, 2 * x.shape[-1], device=x.device)
    return (lambda t: gsa_attention(t, kv, 2, backend="triton"), lambda t: gsa_attention_reference(t, kv, 2))


@pytest.mark.parametrize("make_case,chans", [(_lsa_case, 96), (_gsa_case, 32)], ids=["lsa", "gsa"])
def test_nan_in_attention_inputs_propagates_like_the_reference(make_case, chans):
    """A NaN query or key poisons exactly the outputs it poisons in the reference: no zeroing, and no
    new NaN from masked or padded lanes."""
    x = make_tokens(2, 6, 7, chans, torch.float32, KERNEL_DEVICE)
    x[0, 9, 5] = float("nan")
    op, reference = make_case(x)
    # the math path: CPU's flash SDPA kernel drops a NaN query's row to finite values
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = reference(x)
    actual = op(x)
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("op", ["lsa", "gsa_attention"])
def test_attention_with_every_logit_far_below_zero(op, backend, dtype):
    """Every logit near -120, where exp of any of them underflows: only exp(s - the running max) keeps
    the softmax (a running max that starts at 0 instead of -inf gives 0 / 0). Channel 0 of the queries
    (-600) and keys (1; exact in every dtype) puts the logits there at scale 0.2, the other channels
    spread them (a key component all keys share cancels in dq: at 1, its 16-bit rounding stays small).
    16 bits: in fp32 such logits carry rounding of 120 * 2^-24, near its tolerance."""
    skip_cuda_unless_available(backend)
    if op == "lsa":  # a 7 x 7 map, one window, one head of 16: qkv's q at channel 0, k at 16
        qkv = torch.randn(2, 49, 48, device=KERNEL_DEVICE)
        qkv[..., 0], qkv[..., 16] = -600.0, 1.0
        bias = torch.zeros(48, device=KERNEL_DEVICE)
        check_op_against_reference(lambda qkv: lsa(qkv, bias.to(dtype), (7, 7), 1, 7, 0.2, backend=backend),
                                   lambda qkv: lsa_reference(qkv, bias.double(), (7, 7), 1, 7, 0.2),
                                   [qkv.to(dtype)], dtype)
    else:
        q, kv = torch.randn(2, 30, 16, device=KERNEL_DEVICE), torch.randn(2, 20, 32, device=KERNEL_DEVICE)
        q[..., 0], kv[..., 0] = -600.0, 1.0
        check_op_against_reference(lambda q, kv: gsa_attention(q, kv, 1, 0.2, backend=backend),
                                   lambda q, kv: gsa_attention_reference(q, kv, 1, 0.2), [q.to(dtype), kv.to(dtype)],
                                   dtype)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("kind", SMALL_FUSED_KINDS)
def test_empty_batch_gives_empty_output_and_zero_parameter_grads(kind, backend):
    """A batch of 0 runs on every backend, as PyTorch's own layers and timm's PosConv and
    LocallyGroupedAttn take one (timm's GlobalSubSampleAttn cannot reshape it): the output is empty and
    every parameter gradient zero. No kernel launches (a CUDA grid of no blocks is an error)."""
    if backend == "cuda":
        skip_unless_available("cuda")
    module = small_fused_module(kind, backend)
    size = (13, 17)
    x = torch.randn(0, size[0] * size[1], 32, device=KERNEL_DEVICE, requires_grad=True)
    out = module(x, size)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    for name, param in module.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", SMALL_FUSED_KINDS)
def test_activation_checkpointing_gives_the_plain_gradients(kind, backend, use_reentrant):
    """torch.utils.checkpoint around a fused module (what mmsegmentation's with_cp does to a block): the
    forward runs without saving, then again in the backward, and output and gradients are those of a plain
    run, bit for bit (the kernels are deterministic)."""
    if backend == "cuda":
        skip_unless_available("cuda")
    module = small_fused_module(kind, backend)
    size = (9, 10)
    x = torch.randn(2, size[0] * size[1], 32, device=KERNEL_DEVICE, requires_grad=True)
    grad = torch.randn_like(x)
    runs = []
    for checkpointed in (False, True):
        out = (torch.utils.checkpoint.checkpoint(module, x, size, use_reentrant=use_reentrant) if checkpointed
               else module(x, size))
        out.backward(grad)
        runs.append([out.detach(), x.grad, *(p.grad for p in module.parameters())])
        x.grad = None
        module.zero_grad(set_to_none=True)
    for name, plain, checkpointed in zip(["out", "grad_x", *dict(module.named_parameters())], *runs):
        assert torch.equal(plain, checkpointed), name


def _tokens(chans, height=13, width=17):
    return torch.randn(2, height * width, chans)


STRIDE_0_CASES = {
    "peg": (lambda: [_tokens(32), torch.randn(32, 1, 3, 3), torch.randn(32)],
            lambda backend, x, w, b: peg(x, w, b, (13, 17), backend=backend)),
    **{f"lsa-{pad_mode}": (lambda: [_tokens(96, 8, 9), torch.randn(96)],
                           lambda backend, qkv, bias, pad_mode=pad_mode: lsa(qkv, bias, (8, 9), 2, 7, pad_mode=pad_mode,
                                                                             backend=backend))
       for pad_mode in ("zero", "mask")},
    "gsa_attention": (lambda: [torch.randn(2, 19, 32), torch.randn(2, 7, 64)],
                      lambda backend, q, kv: gsa_attention(q, kv, 1, backend=backend)),
    "gsa_subsample": (lambda: [_tokens(32), torch.randn(32, 32, 4, 4) / 16, torch.randn(32), torch.randn(32),
                               torch.randn(32)],
                      lambda backend, x, *params: gsa_subsample(x, (13, 17), *params, 4, backend=backend)),
}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", list(STRIDE_0_CASES))
def test_sum_backward_gives_each_backward_a_stride_0_gradient(case, backend):
    """``out.sum().backward()`` hands the op's backward a gradient whose strides are all 0 (an expanded
    scalar): no kernel may assume contiguous or 16-byte-aligned rows of it."""
    if backend == "cuda":
        skip_unless_available("cuda")
    make_inputs, call = STRIDE_0_CASES[case]
    inputs = [t.to(KERNEL_DEVICE).requires_grad_() for t in make_inputs()]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(call(backend, *inputs).sum(), inputs)
    expected = torch.autograd.grad(call("torch", *inputs64).sum(), inputs64)
    for index, (actual, wanted) in enumerate(zip(grads, expected)):
        assert rel_err(actual, wanted) <= TOLERANCE[torch.float32], f"gradient of input {index}"


def test_parity_checks_run_pytorch_convolutions_and_matmuls_in_ieee_fp32():
    """cuDNN runs fp32 convolutions in TF32 by default on the GPU (a stride-4 patch conv 3e-4 off, 30
    times the fp32 tolerance): parity checks turn TF32 off while they run and restore the user's flags."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # PyTorch's default for cuDNN; the fixture restores them
    with pytest.raises(RuntimeError, match="inside"):
        with ieee_fp32():
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
            raise RuntimeError("inside")
    assert cudnn.allow_tf32 and matmul.allow_tf32
    seen = []

    def noting_the_flags(module):  # the module under test, noting the flags its forward runs under
        module.register_forward_pre_hook(lambda *_: seen.append((cudnn.allow_tf32, matmul.allow_tf32)))
        return module

    module_parity_errors(PosConv(16, 16), noting_the_flags, make_tokens(1, 3, 3, 16, torch.float32, "cpu"),
                         (3, 3), torch.float32)
    assert seen == [(False, False)] and cudnn.allow_tf32 and matmul.allow_tf32


@pytest.mark.parametrize("kind,op", [("peg", "peg"), ("lsa", "lsa"), ("gsa-sr4", "gsa_subsample"),
                                     ("gsa-sr1", "gsa_attention")])
def test_double_backward_raises_naming_the_op(kind, op):
    """create_graph=True still gives the first gradient; backpropagating through it raises a clear error
    (PyTorch's own asks the user to register an autograd formula)."""
    module = small_fused_module(kind, "triton")
    x = make_tokens(1, 13, 17, 32, torch.float32, KERNEL_DEVICE).requires_grad_()
    (grad,) = torch.autograd.grad(module(x, (13, 17)).square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(module(x, (13, 17)).square().sum(), x)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(NotImplementedError, match=f"twins_kernels: {op} has no double backward"):
        grad.square().sum().backward()


@requires_gpu
@large_gpu_memory
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_peg_offsets_past_2_to_the_31(backend):
    """B*N*C = 3 * 512*512 * 4096 > 2^31 elements: offsets must be 64-bit."""
    skip_unless_available(backend)
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


@requires_gpu
@large_gpu_memory
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_lsa_offsets_past_2_to_the_31(backend):
    """qkv of 2 x 512*512 x 4608 > 2^31 elements (C = 1536, 24 heads of 64)."""
    skip_unless_available(backend)
    batch, height, width, chans, heads = 2, 512, 509, 1536, 24  # 509: padded windows at the edge too
    qkv = torch.randn(batch, height * width, 3 * chans, device="cuda", dtype=torch.bfloat16)
    assert qkv.numel() > 2**31
    bias = torch.randn(3 * chans, device="cuda", dtype=torch.bfloat16)
    last = lsa(qkv, bias, (height, width), heads, 7, backend=backend)[-1:].float()
    expected = lsa_reference(qkv[-1:].float(), bias.float(), (height, width), heads, 7)
    assert rel_err(last, expected) <= TOLERANCE[torch.bfloat16]


@requires_gpu
@large_gpu_memory
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gsa_offsets_past_2_to_the_31(backend):
    """q of 2 x 1024*1024 x 1024 > 2^31 elements, against 1024 sub-sampled keys."""
    skip_unless_available(backend)
    batch, tokens, keys, chans, heads = 2, 1024 * 1024, 1024, 1024, 16
    q = torch.randn(batch, tokens, chans, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    kv = torch.randn(batch, keys, 2 * chans, device="cuda", dtype=torch.bfloat16)
    last = gsa_attention(q, kv, heads, backend=backend)[-1:].float()
    expected = gsa_attention_reference(q[-1:].float(), kv[-1:].float(), heads)
    assert rel_err(last, expected) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["peg", "lsa", "gsa_attention", "gsa_subsample"])
@pytest.mark.parametrize("dim", [0, 1, 2], ids=["batch", "token", "channel"])
def test_views_with_offsets_past_2_to_the_31(dim, op, backend):
    """Token inputs and the output gradient as views whose outermost dimension, batch, token or channel,
    has a stride of about 2^31 / its size, so that its last index starts past element 2^31, on a small
    map: the offsets along it must be 64-bit. In 32 bits (the Triton kernels' channel index times an
    int32 stride) they wrapped and read other memory: an LSA output 1.2 off. Output and input gradients
    against the op on contiguous copies of the same values."""
    skip_cuda_unless_available(backend)
    fn, inputs = _op_and_fp32_inputs(op, backend)
    inputs = [t.half() for t in inputs]
    grad = fn(*inputs).normal_()
    results = []
    for layout in (lambda t: t, lambda t: outermost_past_int32(t, dim)):
        leaves = [(layout(t) if t.dim() == 3 else t).detach().requires_grad_() for t in inputs]
        with poisoned_outputs():
            out = fn(*leaves)
            out.backward(layout(grad))
        results.append([out, *(t.grad for t in leaves)])
        del leaves, out  # the 4 GiB storages
    for index, (contiguous, strided) in enumerate(zip(*results)):
        assert rel_err(strided, contiguous) <= 1e-3, f"result {index} (0: output, then the inputs' gradients)"


@pytest.mark.usefixtures("deterministic_torch_convs")
@requires_concurrent_programs
def test_patched_model_backward_is_bitwise_reproducible():
    """No float atomics anywhere: two backward passes of a patched model give identical gradients."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", pretrained=False, num_classes=10, depths=SHALLOW).to(KERNEL_DEVICE)
    twins_kernels.patch_model(model, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=KERNEL_DEVICE)  # 8x8 first map: padded LSA windows, M=1 GSA
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


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
        plain = timm.create_model("twins_svt_small", pretrained=False, num_classes=10, depths=SHALLOW)
        fused = copy.deepcopy(plain)
        torch.manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(1, 3, 64, 64)
        target = torch.randint(0, 10, (1,))
        grads = []
        for model in (plain, fused):
            ddp = DDP(model)
            if model is fused:  # patched inside the wrapper: the fused modules share the parameters DDP holds
                assert sum(twins_kernels.patch_model(ddp, backend="torch").replaced.values()) > 0
            torch.nn.functional.cross_entropy(ddp(x), target).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        worst = max(rel_err(grads[1][n], grads[0][n]) for n in grads[0])
        results[rank] = worst
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_patched_matches_unpatched():
    """Two gloo ranks on the CPU: the model patched inside its DDP wrapper gives the unpatched model's
    all-reduced gradients. What DDP meets (the fused modules holding its parameters, the ops' autograd
    entries) is the same on every backend; the reference's runs in seconds where the Triton
    interpreter's took a minute on CI's two cores (the kernels' gradients: the parity tests)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_step, args=(2, _free_port(), results), nprocs=2, join=True)
        worst = dict(results)
    assert set(worst) == {0, 1}
    assert all(err <= 10 * TOLERANCE[torch.float32] for err in worst.values()), worst
