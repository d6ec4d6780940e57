"""GSA parity with timm's GlobalSubSampleAttn on every backend, the ops alone, gradcheck, torch.compile,
attention dropout, bad input."""
import math

import pytest
import torch
from timm.models.twins import GlobalSubSampleAttn

import twins_kernels
from twins_kernels import FusedGSA
from twins_kernels.ops import gsa_attention, gsa_attention_reference, gsa_subsample, gsa_subsample_reference
import twins_kernels.ops.gsa as gsa_module
from twins_kernels.ops.gsa import (
    _attention_backward_chunked,
    _attention_backward_reference,
    _attention_forward_chunked,
    _attention_forward_reference,
    gsa_attention_backward_triton,
)
from twins_kernels.testing import module_parity_errors

from conftest import (KERNEL_DEVICE, KERNEL_DTYPES, requires_concurrent_programs, requires_gpu,
                      skip_cuda_unless_available, skip_unless_available)
from parity import (
    DTYPE_IDS, TOLERANCE, assert_rel_close, check_compiled_matches_eager, check_module_parity,
    check_op_against_reference, check_trace_runs_other_sizes, make_tokens, strided_with_nans,
)

# (B, H, W, dim, heads, sr): Twins' head dims 32 and 64 and the 16 / 128 ends, every sr Twins uses and 3,
# maps that are and are not multiples of sr, M = 1 (sr 8 on 14 x 14), a head_dim that is not a power of two
SHAPES = [
    pytest.param(2, 8, 8, 64, 2, 2, id="sr2-hd32-B2"),
    pytest.param(1, 12, 12, 64, 1, 4, id="sr4-hd64"),
    pytest.param(2, 16, 16, 64, 2, 8, id="sr8-hd32-M4-B2"),
    pytest.param(1, 14, 14, 64, 2, 8, id="sr8-14x14-M1"),
    pytest.param(1, 17, 12, 32, 2, 4, id="sr4-17x12-floored-hd16"),
    pytest.param(2, 9, 10, 48, 3, 3, id="sr3-9x10-floored-hd16-B2"),
    pytest.param(1, 6, 8, 48, 2, 2, id="sr2-hd24-not-pow2"),
    pytest.param(1, 7, 6, 34, 2, 1, id="sr1-hd17-odd"),
    pytest.param(1, 6, 6, 128, 1, 2, id="sr2-hd128"),
    pytest.param(1, 9, 7, 64, 4, 1, id="sr1-hd16-N63"),
    pytest.param(2, 10, 13, 128, 1, 1, id="sr1-hd128-N130-B2"),
]


def fused_on(backend):
    return lambda module: FusedGSA.from_module(module, backend=backend)


def check_gsa_parity(module, backend, x, size, dtype):
    """check_module_parity, but with a single key (M = 1) the softmax is 1 and the output does not depend
    on q: q's gradients are rounding noise in the reference as well, so their relative error means
    nothing and they only have to be finite (an unwritten element is NaN). test_single_key checks them."""
    height, width = size
    sr = module.sr_ratio
    if (height // sr) * (width // sr) > 1:
        return check_module_parity(module, fused_on(backend), x, size, dtype)
    errors = module_parity_errors(module, fused_on(backend), x, size, dtype)
    q_grads = {name: errors.pop(name) for name in ("grad_q.weight", "grad_q.bias")}
    assert all(math.isfinite(err) for err in q_grads.values()), q_grads
    failed = {name: err for name, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not failed, f"relative errors above {TOLERANCE[dtype]:.0e} ({DTYPE_IDS[dtype]}): {failed}"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,sr", SHAPES)
def test_triton_matches_timm(batch, height, width, dim, heads, sr, dtype):
    x = make_tokens(batch, height, width, dim, dtype, KERNEL_DEVICE)
    module = GlobalSubSampleAttn(dim, num_heads=heads, sr_ratio=sr)
    check_gsa_parity(module, "triton", x, (height, width), dtype)


@pytest.mark.parametrize("sr", [1, 2])
def test_triton_non_contiguous_input(sr):
    x = make_tokens(2, 6, 9, 64, torch.float32, KERNEL_DEVICE, contiguous=False)
    assert not x.is_contiguous()
    module = GlobalSubSampleAttn(64, num_heads=2, sr_ratio=sr)
    check_gsa_parity(module, "triton", x, (6, 9), torch.float32)


@pytest.mark.parametrize("batch,height,width,dim,heads,sr", [
    pytest.param(2, 8, 8, 64, 2, 2, id="sr2"),
    pytest.param(1, 17, 12, 32, 2, 4, id="sr4-floored"),
    pytest.param(1, 14, 14, 64, 2, 8, id="sr8-M1"),
    pytest.param(1, 9, 7, 24, 3, 1, id="sr1-hd8"),
    pytest.param(1, 33, 33, 32, 2, 1, id="sr1-N1089-two-query-chunks"),
])
def test_reference_backend_matches_timm(batch, height, width, dim, heads, sr):
    x = make_tokens(batch, height, width, dim, torch.float32, "cpu")
    module = GlobalSubSampleAttn(dim, num_heads=heads, sr_ratio=sr)
    check_gsa_parity(module, "torch", x, (height, width), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_attention_reads_strided_q_and_kv(dtype, backend):
    """q and kv as views with padded rows and permuted storage (channels not adjacent): the kernels read
    them by strides; PyTorch's fused CPU attention, which the torch backend runs on CPU, would read a
    row's channels as adjacent, and gets copies where they are not."""
    batch, tokens, keys, chans, heads = 2, 21, 11, 64, 2
    q = torch.randn(batch, chans, tokens + 3, device=KERNEL_DEVICE).to(dtype).transpose(1, 2)[:, 3:]
    kv = torch.randn(2 * chans + 5, keys, batch, device=KERNEL_DEVICE).to(dtype).permute(2, 1, 0)[..., 5:]
    assert not q.is_contiguous() and not kv.is_contiguous()
    q.requires_grad_()
    kv.requires_grad_()
    out = gsa_attention(q, kv, heads, backend=backend)
    q_ref, kv_ref = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    out_ref = gsa_attention_reference(q_ref, kv_ref, heads)
    grad = torch.randn_like(out_ref).to(dtype).double()
    out.backward(grad.to(dtype))
    out_ref.backward(grad)
    assert_rel_close(out, out_ref, dtype, "out")
    assert_rel_close(q.grad, q_ref.grad, dtype, "grad_q")
    assert_rel_close(kv.grad, kv_ref.grad, dtype, "grad_kv")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_an_explicit_scale_reaches_the_kernels(backend):
    """A scale other than head_dim ** -0.5 (the ops take any), forward and backward."""
    skip_cuda_unless_available(backend)
    q = make_tokens(2, 21, 1, 32, torch.float32, KERNEL_DEVICE)  # 2 heads of 16
    kv = make_tokens(2, 6, 1, 64, torch.float32, KERNEL_DEVICE)
    check_op_against_reference(lambda q, kv: gsa_attention(q, kv, 2, scale=0.6, backend=backend),
                               lambda q, kv: gsa_attention_reference(q, kv, 2, scale=0.6), [q, kv], torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_single_key(dtype):
    """M = 1: every query's output is the one value row, and q gets no gradient."""
    q = torch.randn(2, 40, 64, device=KERNEL_DEVICE).to(dtype).requires_grad_()
    kv = torch.randn(2, 1, 128, device=KERNEL_DEVICE).to(dtype).requires_grad_()
    out = gsa_attention(q, kv, 2, backend="triton")
    torch.testing.assert_close(out, kv[:, :, 64:].expand_as(out), rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all()
    assert q.grad.norm() <= 1e-4 * kv.grad.norm()  # rounding noise of p (dp - delta) = 1 * 0
    assert_rel_close(kv.grad[:, :, 64:], grad.double().sum(1, keepdim=True), dtype, "grad_v = sum of grad_out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("keys", [2, 49])
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_backward_on_near_identical_values(backend, keys, dtype, monkeypatch):
    """Values that differ by 1% (v_j = v + 0.01 noise_j): dP_ij = dO_i . v_j nearly agree, dP_ij - delta_i
    cancels in dS = P (dP - delta), and delta taken from the 16-bit output (rowsum(dO * O)) put dq up to
    7.7e-2 (fp16) and 5.1e-1 (bf16) off; taken from P and dP (the keys are one block: M = 49 is every
    Twins stage at 224 x 224), 3.7e-4 and 3e-3. Eight fresh inputs, each within the tolerance. The torch
    backend as it runs off the CPU (query chunks; on CPU tensors it runs PyTorch's fused CPU attention,
    which takes delta from the output, as timm does there)."""
    skip_cuda_unless_available(backend)
    monkeypatch.setattr(gsa_module, "fused_cpu_attention", lambda t: False)
    for _ in range(8):
        q = torch.randn(1, 16, 16, device=KERNEL_DEVICE).to(dtype)
        values = torch.randn(1, 1, 16, device=KERNEL_DEVICE) + 0.01 * torch.randn(1, keys, 16, device=KERNEL_DEVICE)
        kv = torch.cat([torch.randn(1, keys, 16, device=KERNEL_DEVICE), values], dim=-1).to(dtype)
        check_op_against_reference(lambda q, kv: gsa_attention(q, kv, 1, backend=backend),
                                   lambda q, kv: gsa_attention_reference(q, kv, 1), [q, kv], dtype)


@pytest.mark.parametrize("keys", [9, 40], ids=["one-key-block", "two-key-blocks"])
@pytest.mark.parametrize("query_splits", [1, 2, 5])
def test_dkdv_query_splits_agree(query_splits, keys):
    """The dk/dv query loop split over programs (fp32 partials) matches the unsplit kernel and the reference:
    with one key block (the dk/dv kernel computes dq as well) and two (fp32 takes 32 keys a block; the dq
    kernel runs first)."""
    batch, tokens, chans, heads, scale = 1, 150, 32, 1, 0.3
    q = torch.randn(batch, tokens, chans, device=KERNEL_DEVICE)
    kv = torch.randn(batch, keys, 2 * chans, device=KERNEL_DEVICE)
    grad = torch.randn(batch, tokens, chans, device=KERNEL_DEVICE)
    out, lse = _attention_forward_reference(q, kv, heads, scale)
    expected = _attention_backward_reference(grad, q, kv, out, lse, heads, scale)
    actual = gsa_attention_backward_triton(grad, q, kv, out, lse, heads, scale, query_splits=query_splits)
    assert_rel_close(actual[0], expected[0], torch.float32, "grad_q")
    assert_rel_close(actual[1], expected[1], torch.float32, "grad_kv")


def test_default_backward_splits_the_query_loop_where_the_keys_are_few(monkeypatch):
    """One key block per batch and head would leave most of a GPU idle in the dk/dv kernel: the default
    backward splits its query loop over programs (NOTES 34; here by the interpreter's program target),
    with the unsplit kernel's results."""
    picked = []
    pick = gsa_module._dkdv_query_splits
    monkeypatch.setattr(gsa_module, "_dkdv_query_splits", lambda *args: picked.append(pick(*args)) or picked[-1])
    q = torch.randn(1, 150, 32, device=KERNEL_DEVICE)
    kv = torch.randn(1, 9, 64, device=KERNEL_DEVICE)
    grad = torch.randn(1, 150, 32, device=KERNEL_DEVICE)
    out, lse = _attention_forward_reference(q, kv, 1, 0.3)
    split = gsa_attention_backward_triton(grad, q, kv, out, lse, 1, 0.3)
    assert picked[0] > 1
    unsplit = gsa_attention_backward_triton(grad, q, kv, out, lse, 1, 0.3, query_splits=1)
    assert_rel_close(split[0], unsplit[0], torch.float32, "grad_q")
    assert_rel_close(split[1], unsplit[1], torch.float32, "grad_kv")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("keys", [20, 70], ids=["one-key-block", "several-key-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_backward_delta_is_relative_to_the_recomputed_probabilities(dtype, keys, backend, monkeypatch):
    """Given an lse log(2) too high, the recomputed P halves, and so must every gradient: where the keys
    are one block Triton's dk/dv kernel takes delta = rowsum(P dP) / rowsum(P) (NOTES 34), as the torch
    backend's query chunks (off the CPU) do, which does not halve; without the division it would, and
    each dS = P (dP - delta) would move off that half. Past one block Triton's delta comes from the
    output, which the lse leaves as it is."""
    monkeypatch.setattr(gsa_module, "fused_cpu_attention", lambda t: False)
    q = torch.randn(2, 30, 64, device=KERNEL_DEVICE).to(dtype)  # 2 heads of 32
    kv = torch.randn(2, keys, 128, device=KERNEL_DEVICE).to(dtype)
    grad_out = torch.randn(2, 30, 64, device=KERNEL_DEVICE).to(dtype)
    out, lse = gsa_module.gsa_attention_forward(q, kv, 2, 0.25, backend)
    true_grads = gsa_module.gsa_attention_backward(grad_out, q, kv, out, lse, 2, 0.25, backend)
    halved_grads = gsa_module.gsa_attention_backward(grad_out, q, kv, out, lse + math.log(2.0), 2, 0.25, backend)
    for name, true, halved in zip(("grad_q", "grad_kv"), true_grads, halved_grads):
        assert true.abs().max() > 0, name
        assert_rel_close(halved, true / 2, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_chunked_reference_matches_the_fused_cpu_attention(dtype, monkeypatch):
    """The torch backend's attention is PyTorch's fused CPU kernel on CPU and query chunks elsewhere (a GPU):
    both on CPU tensors, with 16-query chunks (two and a rest of one), give the same out, lse and gradients."""
    monkeypatch.setattr(gsa_module, "REFERENCE_QUERY_CHUNK", 16)
    q = torch.randn(2, 33, 64).to(dtype)
    kv = torch.randn(2, 9, 128).to(dtype)
    grad = torch.randn(2, 33, 64).to(dtype)
    out, lse = _attention_forward_reference(q, kv, 2, 0.3)
    chunked_out, chunked_lse = _attention_forward_chunked(q, kv, 2, 0.3)
    assert lse.dtype == chunked_lse.dtype and lse.is_contiguous() and out.is_contiguous()
    grads = _attention_backward_reference(grad, q, kv, out, lse, 2, 0.3)
    chunked_grads = _attention_backward_chunked(grad, q, kv, chunked_lse, 2, 0.3)
    for name, actual, expected in zip(("out", "lse", "grad_q", "grad_kv"), (out, lse, *grads),
                                      (chunked_out, chunked_lse, *chunked_grads)):
        assert_rel_close(actual, expected, dtype, name)


@pytest.mark.parametrize("x_scale", [1.0, 1e-3], ids=["unit-tokens", "quiet-tokens"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-params"])
@pytest.mark.parametrize("sr", [2, 3])
def test_subsample_matches_the_conv_and_layernorm(sr, strided, x_scale):
    """gsa_subsample alone, channels past one output-channel chunk (C = 96 > 64): the chunked LayerNorm;
    with every parameter a strided view among NaNs (read as if contiguous, they poison the output); and
    tokens whose conv output varies less than the LayerNorm's eps, where eps's place in the rstd shows."""
    x = (make_tokens(2, 7, 8, 96, torch.float32, KERNEL_DEVICE) * x_scale).requires_grad_()
    conv = torch.nn.Conv2d(96, 96, sr, sr, device=KERNEL_DEVICE)
    norm = torch.nn.LayerNorm(96, device=KERNEL_DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    params = (conv.weight, conv.bias, norm.weight, norm.bias)
    if strided:
        params = tuple(strided_with_nans(p) for p in params)
    out = gsa_subsample(x, (7, 8), *params, sr, backend="triton")
    expected = gsa_subsample_reference(x, (7, 8), *params, sr)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, *params), grad)
    expected_grads = torch.autograd.grad(expected, (x, *params), grad)
    assert_rel_close(out, expected, torch.float32, "out")
    names = ["x", "sr_weight", "sr_bias", "norm_weight", "norm_bias"]
    for name, actual, reference in zip(names, grads, expected_grads):
        assert_rel_close(actual, reference, torch.float32, f"grad_{name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_subsample_takes_its_eps(backend):
    """An eps other than timm's 1e-5 reaches the LayerNorm of every backend."""
    x = make_tokens(2, 4, 6, 16, torch.float32, KERNEL_DEVICE)
    conv = torch.nn.Conv2d(16, 16, 2, 2, device=KERNEL_DEVICE)
    norm = torch.nn.LayerNorm(16, eps=0.1, device=KERNEL_DEVICE)
    params = (conv.weight, conv.bias, norm.weight, norm.bias)
    actual = gsa_subsample(x, (4, 6), *params, 2, eps=0.1, backend=backend)
    assert_rel_close(actual, gsa_subsample_reference(x, (4, 6), *params, 2, eps=0.1), torch.float32, "out")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_float64(backend):
    # fast mode (a random projection of the Jacobian) keeps the interpreter run to seconds
    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)

    for keys in (3, 40):  # one key block, two (32 keys a block in float64): with and without the dq kernel
        q, kv = make(2, 5, 32), make(2, keys, 64)
        assert torch.autograd.gradcheck(lambda a, b: gsa_attention(a, b, 2, backend=backend), (q, kv),
                                        fast_mode=True)
    x, weight, bias, norm_weight, norm_bias = make(1, 15, 16), make(16, 16, 2, 2), make(16), make(16), make(16)
    assert torch.autograd.gradcheck(lambda *a: gsa_subsample(a[0], (3, 5), *a[1:], sr_ratio=2, backend=backend),
                                    (x, weight, bias, norm_weight, norm_bias), fast_mode=True)


def backward_twice(module, x, size):
    grads = []
    for _ in range(2):
        module.zero_grad()
        x.grad = None
        module(x, size).float().square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    return grads


@requires_concurrent_programs
def test_backward_is_bitwise_reproducible():
    module = FusedGSA(32, num_heads=2, sr_ratio=2, backend="triton").to(KERNEL_DEVICE)
    x = make_tokens(2, 6, 10, 32, torch.float32, KERNEL_DEVICE).requires_grad_()
    first, second = backward_twice(module, x, (6, 10))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.usefixtures("deterministic_torch_convs")
@requires_gpu
def test_cuda_backward_is_bitwise_reproducible():
    """sr = 8 on 56 x 56: one key tile a batch element and head, so the dk/dv query loop is split across
    blocks whose fp32 shares are summed in a fixed order (tensor-core kernels in bf16)."""
    skip_unless_available("cuda")
    module = FusedGSA(64, num_heads=1, sr_ratio=8, backend="cuda").to("cuda", torch.bfloat16)
    x = make_tokens(2, 56, 56, 64, torch.bfloat16, "cuda").requires_grad_()
    first, second = backward_twice(module, x, (56, 56))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """The custom ops keep the kernels opaque to dynamo: no graph break, same numbers and gradients."""
    module = FusedGSA(32, num_heads=2, sr_ratio=2, backend=backend).to(KERNEL_DEVICE)
    check_compiled_matches_eager(module, [(make_tokens(2, 4, 6, 32, torch.float32, KERNEL_DEVICE), (4, 6))],
                                 "aot_eager")


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_torch_compile_dynamic_shapes_one_graph(sr_ratio):
    """Maps with and without rows and columns the conv drops, another batch: one graph."""
    module = FusedGSA(32, num_heads=2, sr_ratio=sr_ratio, backend="triton").to(KERNEL_DEVICE)
    inputs = [(make_tokens(batch, h, w, 32, torch.float32, KERNEL_DEVICE), (h, w))
              for batch, h, w in [(2, 4, 6), (3, 5, 7), (2, 2, 9)]]
    check_compiled_matches_eager(module, inputs, "aot_eager", dynamic=True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_the_attention_dropout_path_traces_and_compiles_for_every_map_size(sr_ratio):
    """In training with attn_drop > 0 the module runs gsa_attention_reference on the sub-sampled keys, whose
    shape it takes from the tensors: a trace runs other map sizes, and a dynamic compile runs them on one
    graph, each drawing the dropout eager draws."""
    module = FusedGSA(32, num_heads=2, attn_drop=0.5, sr_ratio=sr_ratio).to(KERNEL_DEVICE).train()
    check_trace_runs_other_sizes(module, [(1, 32, 16, 24), (1, 32, 24, 16), (2, 32, 18, 10), (1, 32, 14, 21)])
    inputs = [(make_tokens(batch, h, w, 32, torch.float32, KERNEL_DEVICE), (h, w))
              for batch, h, w in [(2, 4, 6), (3, 5, 7), (2, 2, 9)]]
    check_compiled_matches_eager(module, inputs, "aot_eager", dynamic=True)


def test_from_module_keeps_the_eval_mode_and_input_errors_name_x():
    timm_module = GlobalSubSampleAttn(32, num_heads=2, attn_drop=0.5, sr_ratio=2).eval()
    fused = FusedGSA.from_module(timm_module, backend="torch")
    assert not fused.training
    x = make_tokens(2, 4, 6, 32, torch.float32, "cpu")
    torch.testing.assert_close(fused(x, (4, 6)), timm_module(x, (4, 6)))
    with pytest.raises(ValueError, match="x has C=16 channels, expected 32"):
        fused(x[..., :16], (4, 6))


def test_attention_dropout_in_training_runs_the_reference():
    timm_module = GlobalSubSampleAttn(32, num_heads=2, attn_drop=0.5, sr_ratio=2)
    timm_module.fused_attn = True  # SDPA's dropout, which the reference path uses too
    fused = FusedGSA.from_module(timm_module, backend="torch")
    x = make_tokens(2, 4, 6, 32, torch.float32, "cpu")
    for module in (timm_module, fused):
        module.train()
    torch.manual_seed(1)
    expected = timm_module(x, (4, 6))
    torch.manual_seed(1)
    actual = fused(x, (4, 6))
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(fused(x, (4, 6)), actual), "dropout must draw a fresh mask each call"
    for module in (timm_module, fused):
        module.eval()
    torch.testing.assert_close(fused(x, (4, 6)), timm_module(x, (4, 6)))


@pytest.mark.parametrize("sr", [1, 4])
def test_state_dict_keys_and_sharing_match_timm(sr):
    timm_module = GlobalSubSampleAttn(64, num_heads=2, sr_ratio=sr)
    fused = FusedGSA(64, num_heads=2, sr_ratio=sr)
    assert list(fused.state_dict()) == list(timm_module.state_dict())
    fused.load_state_dict(timm_module.state_dict())
    shared = FusedGSA.from_module(timm_module)
    assert list(shared.state_dict()) == list(timm_module.state_dict())
    assert shared.q.weight is timm_module.q.weight and shared.kv is timm_module.kv
    assert (shared.sr is None) == (sr == 1) and (shared.norm is None) == (sr == 1)
    for name in ("dim", "num_heads", "scale", "sr_ratio"):
        assert getattr(shared, name) == getattr(fused, name) == getattr(timm_module, name)


def test_head_dim_outside_the_kernels_raises_on_kernel_backends_only():
    """Naming a kernel backend raises; ``auto`` (on a GPU: triton) runs the reference instead."""
    q, kv = torch.randn(1, 6, 16, device=KERNEL_DEVICE), torch.randn(1, 3, 32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="head_dim = C / num_heads = 16 / 2 = 8 is outside 16..128"):
        gsa_attention(q, kv, 2, backend="triton")
    expected = gsa_attention_reference(q, kv, 2)
    torch.testing.assert_close(gsa_attention(q, kv, 2, backend="torch"), expected)
    torch.testing.assert_close(gsa_attention(q, kv, 2, backend="auto"), expected)


def _attention_case(call):
    def run(x, params):
        q, kv = torch.cat([x, x], dim=-1), torch.randn(2, 5, 32, device=x.device)  # C = 16
        return call(q, kv)
    return run


def _subsample_case(call):
    def run(x, params):
        return call(x, *params)
    return run


BAD_INPUTS = [
    ("q rank", _attention_case(lambda q, kv: gsa_attention(q[0], kv, 1)), ValueError, "q must have 3 dims"),
    ("kv channels", _attention_case(lambda q, kv: gsa_attention(q, kv[..., :30], 1)), ValueError, "2C=32"),
    ("kv batch", _attention_case(lambda q, kv: gsa_attention(q, kv[:1], 1)), ValueError, "(B=2, M >= 1"),
    ("no keys", _attention_case(lambda q, kv: gsa_attention(q, kv[:, :0], 1)), ValueError, "M >= 1"),
    ("heads divide C", _attention_case(lambda q, kv: gsa_attention(q, kv, 3)), ValueError, "num_heads=3"),
    ("heads positive", _attention_case(lambda q, kv: gsa_attention(q, kv, 0)), ValueError, "got 0"),
    ("q dtype", _attention_case(lambda q, kv: gsa_attention(q.int(), kv, 1)), TypeError, "torch.int32"),
    ("dtype mix", _attention_case(lambda q, kv: gsa_attention(q, kv.double(), 1)), TypeError, "torch.float64"),
    ("q not a tensor", _attention_case(lambda q, kv: gsa_attention(q.tolist(), kv, 1)), TypeError, "list"),
    ("scale", _attention_case(lambda q, kv: gsa_attention(q, kv, 1, scale="0.1")), TypeError, "'0.1'"),
    ("attention backend", _attention_case(lambda q, kv: gsa_attention(q, kv, 1, backend="cudnn")), ValueError,
     "cudnn"),
    ("x rank", _subsample_case(lambda x, *p: gsa_subsample(x[0], (4, 5), *p, 2)), ValueError, "(B, N, C)"),
    ("N != H*W", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 4), *p, 2)), ValueError, "N=20"),
    ("size not ints", _subsample_case(lambda x, *p: gsa_subsample(x, (4.0, 5), *p, 2)), TypeError, "4.0"),
    ("sr_ratio zero", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 5), *p, 0)), ValueError, "sr_ratio"),
    ("sr_ratio float", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 5), *p, 2.0)), TypeError, "2.0"),
    ("sr_ratio a bool", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 5), *p, True)), TypeError,
     "True of type bool"),
    ("sr_ratio > size", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 5), *p, 5)), ValueError,
     "smaller than sr_ratio=5"),
    ("conv weight shape", _subsample_case(lambda x, w, *p: gsa_subsample(x, (4, 5), w[:4], *p, 2)), ValueError,
     "sr_weight has shape (4, 8, 2, 2)"),
    ("norm shape", _subsample_case(lambda x, w, b, nw, nb: gsa_subsample(x, (4, 5), w, b, nw[:3], nb, 2)),
     ValueError, "norm_weight has shape (3,)"),
    ("param dtype", _subsample_case(lambda x, w, b, nw, nb: gsa_subsample(x, (4, 5), w, b.int(), nw, nb, 2)),
     TypeError, "sr_bias has dtype torch.int32"),
    ("eps", _subsample_case(lambda x, *p: gsa_subsample(x, (4, 5), *p, 2, eps=0.0)), ValueError, "eps must be > 0"),
    ("module heads", lambda x, p: FusedGSA(8, num_heads=3), ValueError, "num_heads 3"),
    ("module size", lambda x, p: FusedGSA(8, num_heads=1, sr_ratio=2).to(x.device)(x, (5, 5)), ValueError, "N=20"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case,call,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_value(case, call, error, message, backend):
    x = torch.randn(2, 20, 8, device=KERNEL_DEVICE)
    params = (torch.randn(8, 8, 2, 2, device=KERNEL_DEVICE),) + tuple(torch.randn(8, device=KERNEL_DEVICE)
                                                                      for _ in range(3))
    with twins_kernels.use_backend(backend), pytest.raises(error) as info:
        call(x, params)
    assert message in str(info.value)


def test_cuda_backend_on_cpu_tensors_raises_clearly():
    q, kv = torch.randn(1, 4, 32), torch.randn(1, 2, 64)
    with pytest.raises(twins_kernels.BackendUnavailableError, match="cuda"):
        gsa_attention(q, kv, 1, backend="cuda")


@requires_gpu
def test_device_mix_raises():
    q = torch.randn(1, 4, 32, device="cuda")
    with pytest.raises(ValueError, match="cpu"):
        gsa_attention(q, torch.randn(1, 2, 64), 1)
    with pytest.raises(ValueError, match="cpu"):
        gsa_subsample(q, (2, 2), torch.randn(32, 32, 2, 2), *(torch.randn(32, device="cuda") for _ in range(3)), 2)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,sr", SHAPES + [
    pytest.param(4, 56, 56, 64, 1, 8, id="pcpvt-s-224-stage1"),
    pytest.param(2, 28, 28, 128, 2, 4, id="pcpvt-s-224-stage2"),
    pytest.param(2, 32, 32, 320, 5, 2, id="pcpvt-s-512-stage3"),
    pytest.param(2, 64, 64, 64, 2, 1, id="sr1-N4096"),  # the online softmax over 64 key tiles
])
def test_cuda_backend_matches_timm(batch, height, width, dim, heads, sr, dtype):
    skip_unless_available("cuda")
    x = make_tokens(batch, height, width, dim, dtype, "cuda")
    module = GlobalSubSampleAttn(dim, num_heads=heads, sr_ratio=sr)
    check_gsa_parity(module, "cuda", x, (height, width), dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,sr", [
    pytest.param(2, 64, 64, 64, 2, 1, id="sr1-N4096"),
    pytest.param(8, 56, 56, 64, 1, 8, id="pcpvt-s-224-stage1-bs8"),
    pytest.param(4, 32, 32, 512, 16, 2, id="svt-l-512-stage3"),
    pytest.param(2, 64, 64, 256, 8, 4, id="svt-b-1024-stage2"),
])
def test_triton_large_shapes_on_gpu(batch, height, width, dim, heads, sr, dtype):
    x = make_tokens(batch, height, width, dim, dtype, "cuda")
    module = GlobalSubSampleAttn(dim, num_heads=heads, sr_ratio=sr)
    check_gsa_parity(module, "triton", x, (height, width), dtype)


@requires_gpu
def test_torch_compile_inductor_on_gpu():
    module = FusedGSA(64, num_heads=2, sr_ratio=2).cuda()
    x = make_tokens(2, 8, 8, 64, torch.float32, "cuda").requires_grad_()
    expected = module(x, (8, 8))
    compiled = torch.compile(lambda t: module(t, (8, 8)), fullgraph=True)
    actual = compiled(x)
    # inductor may fuse the Linears' bias adds differently: fp32 rounding, not a different result
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    actual.sum().backward()
    assert torch.isfinite(x.grad).all()
