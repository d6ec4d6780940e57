"""LSA parity with timm's LocallyGroupedAttn (zero padding) and an mmsegmentation-style masked stand-in
(mask padding) on every backend, gradcheck, torch.compile, attention-dropout routing, bad input."""
import importlib
import math

import pytest
import torch
from timm.models.twins import LocallyGroupedAttn

import twins_kernels
from twins_kernels import FusedLSA
from twins_kernels.ops import lsa, lsa_reference

from conftest import (KERNEL_DEVICE, KERNEL_DTYPES, cuda_backend_reason, load_benchmarks_module,
                      requires_concurrent_programs, requires_gpu, skip_unless_available, skip_cuda_unless_available)
from parity import (
    DTYPE_IDS, assert_rel_close, check_compiled_matches_eager, check_module_parity, check_op_against_reference,
    check_trace_runs_other_sizes, make_tokens, rel_err, strided_with_nans,
)

lsa_module = importlib.import_module("twins_kernels.ops.lsa")  # the package's `lsa` is the op function


class MmsegMaskedAttn(LocallyGroupedAttn):
    """mmsegmentation's LSA (its forward, the stand-in's: benchmarks/mmseg_standins.py) with timm's
    constructor. It masks the padded keys where the map is padded on both sides and nothing where on one
    side only: pad_mode "mmseg" matches it on every map, "mask" where both sides or none are padded (on
    one side only it is checked against ``lsa_reference``, which masks exactly the padded positions, in
    test_mask_mode_one_sided_padding)."""

    @property
    def window_size(self) -> int:
        return self.ws

    forward = load_benchmarks_module("mmseg_standins.py").LocallyGroupedSelfAttention.forward


# (B, H, W, dim, heads, ws): Twins-SVT-S's four stages (head_dim 32) on small maps, maps that ws does
# not divide (one window smaller than the pad, a single row), ws 2 to 16 (16-slot tiles; 128 and 256
# slots, which take the multi-block paths), head_dim 16 to 128
SHAPES = [
    pytest.param(2, 14, 14, 64, 2, 7, id="svt-s-stage1-C64-bs2"),
    pytest.param(1, 7, 7, 128, 4, 7, id="svt-s-stage2-C128"),
    pytest.param(1, 7, 7, 256, 8, 7, id="svt-s-stage3-C256"),
    pytest.param(1, 7, 7, 512, 16, 7, id="svt-s-stage4-C512"),
    pytest.param(1, 13, 17, 32, 2, 7, id="13x17-D16"),
    pytest.param(2, 1, 9, 64, 2, 7, id="1x9-bs2"),
    pytest.param(1, 8, 8, 64, 1, 7, id="8x8-ws7-D64"),
    pytest.param(2, 6, 5, 32, 1, 2, id="ws2-6x5"),
    pytest.param(1, 9, 11, 64, 4, 4, id="ws4-9x11-D16"),
    pytest.param(1, 6, 5, 34, 2, 3, id="ws3-6x5-D17-odd"),
    pytest.param(1, 5, 6, 128, 1, 3, id="ws3-D128"),
    pytest.param(1, 9, 10, 128, 1, 7, id="ws7-D128"),  # fp32: 16-slot blocks (lsa_tiles), the dQ kernel
    pytest.param(1, 10, 11, 32, 1, 9, id="ws9-128-slots"),
    pytest.param(1, 17, 16, 16, 1, 16, id="ws16-256-slots"),
]

# padded on both sides, or not at all: where the verbatim mmseg stand-in masks exactly the padding
MASK_SHAPES = [
    pytest.param(1, 13, 17, 32, 2, 7, id="13x17"),
    pytest.param(2, 1, 9, 64, 2, 7, id="1x9-bs2"),
    pytest.param(1, 8, 8, 64, 1, 7, id="8x8-ws7"),
    pytest.param(1, 14, 14, 64, 2, 7, id="14x14-no-padding"),
    pytest.param(1, 10, 11, 32, 1, 9, id="ws9-128-slots"),
]


def fused_on(backend, pad_mode="zero"):
    return lambda module: FusedLSA.from_module(module, backend=backend, pad_mode=pad_mode)


def padded_on_both_sides(height, width, ws):
    return height % ws != 0 and width % ws != 0


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,ws", SHAPES)
def test_triton_matches_timm(batch, height, width, dim, heads, ws, dtype):
    x = make_tokens(batch, height, width, dim, dtype, KERNEL_DEVICE)
    check_module_parity(LocallyGroupedAttn(dim, heads, ws=ws), fused_on("triton"), x, (height, width), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,ws", MASK_SHAPES)
def test_triton_mask_mode_matches_mmseg(batch, height, width, dim, heads, ws, dtype):
    x = make_tokens(batch, height, width, dim, dtype, KERNEL_DEVICE)
    check_module_parity(MmsegMaskedAttn(dim, heads, ws=ws), fused_on("triton", "mask"), x, (height, width), dtype)


# padded at the right only, at the bottom only, on both sides: mmsegmentation masks on the last alone
MMSEG_SHAPES = [
    pytest.param(2, 14, 10, 32, 2, 7, id="14x10-right"),
    pytest.param(1, 9, 14, 64, 2, 7, id="9x14-bottom"),
    pytest.param(1, 13, 17, 32, 2, 7, id="13x17-both"),
]


@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,ws", MMSEG_SHAPES)
def test_mmseg_mode_matches_mmseg_on_every_padding(batch, height, width, dim, heads, ws, dtype, backend):
    skip_cuda_unless_available(backend)
    x = make_tokens(batch, height, width, dim, dtype, KERNEL_DEVICE)
    check_module_parity(MmsegMaskedAttn(dim, heads, ws=ws), fused_on(backend, "mmseg"), x, (height, width), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("height,width,ws", [(14, 10, 7), (9, 14, 7), (10, 9, 9)])
def test_mask_mode_one_sided_padding(height, width, ws, backend):
    """Padded on one side only: mask mode excludes exactly the padded keys (lsa_reference), which
    differs from zero padding."""
    assert not padded_on_both_sides(height, width, ws)
    qkv = torch.randn(2, height * width, 3 * 32, dtype=torch.float64, device=KERNEL_DEVICE)
    bias = torch.randn(3 * 32, dtype=torch.float64, device=KERNEL_DEVICE)
    args = (qkv, bias, (height, width), 2, ws)
    expected = lsa_reference(*args, pad_mode="mask")
    assert_rel_close(lsa(*args, pad_mode="mask", backend=backend), expected, torch.float64, "mask out")
    assert (expected - lsa_reference(*args)).abs().max() > 1e-3, "masking must change the padded windows"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
def test_an_explicit_scale_reaches_the_kernels(pad_mode, backend):
    """A scale other than head_dim ** -0.5 (the ops take any), forward and backward, on a padded map."""
    skip_cuda_unless_available(backend)
    qkv = make_tokens(2, 5, 9, 96, torch.float32, KERNEL_DEVICE)  # 2 heads of 16
    bias = torch.randn(96, device=KERNEL_DEVICE)
    check_op_against_reference(lambda q, b: lsa(q, b, (5, 9), 2, 4, scale=0.6, pad_mode=pad_mode, backend=backend),
                               lambda q, b: lsa_reference(q, b, (5, 9), 2, 4, scale=0.6, pad_mode=pad_mode),
                               [qkv, bias], torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_triton_non_contiguous_qkv_grad_out_and_bias_dtype(dtype):
    """qkv, grad_out and the bias of arbitrary strides, and an fp32 bias with 16-bit qkv (what autocast
    hands). The bias's every other element is NaN: read as if contiguous, it would poison the output."""
    batch, height, width, chans, heads, ws = 2, 9, 8, 64, 2, 7
    tokens = height * width
    qkv = torch.randn(batch, 6 * chans, tokens, device=KERNEL_DEVICE).to(dtype).transpose(1, 2)[..., ::2]
    grad_out = torch.randn(batch, chans, tokens, device=KERNEL_DEVICE).to(dtype).transpose(1, 2)
    bias = strided_with_nans(torch.randn(3 * chans, device=KERNEL_DEVICE).requires_grad_())
    assert qkv.stride(2) == 2 * tokens and grad_out.stride(2) == tokens  # channels strided, not contiguous
    qkv.requires_grad_()
    out = lsa(qkv, bias, (height, width), heads, ws, backend="triton")
    grad_qkv, grad_bias = torch.autograd.grad(out, (qkv, bias), grad_out)
    assert grad_bias.dtype == torch.float32

    qkv_ref = qkv.detach().double().requires_grad_()
    bias_ref = bias.detach().to(dtype).double().requires_grad_()  # the kernels use the bias in qkv's dtype
    expected = lsa_reference(qkv_ref, bias_ref, (height, width), heads, ws)
    expected_qkv, expected_bias = torch.autograd.grad(expected, (qkv_ref, bias_ref), grad_out.double())
    assert_rel_close(out, expected, dtype, "out")
    assert_rel_close(grad_qkv, expected_qkv, dtype, "grad_qkv")
    assert_rel_close(grad_bias, expected_bias, dtype, "grad_bias")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_backward_on_windows_of_mostly_padded_keys(backend, pad_mode, dtype, monkeypatch):
    """A 2 x 1 map in an 8 x 8 window: in zero mode 62 of the 64 keys are the same (the qkv bias), so
    dP - delta cancels in dS = P (dP - delta), and delta taken from the 16-bit output (rowsum(dO * O))
    put dQ 1.7e-2 (fp16) and 4.5e-2 (bf16) off, past the tolerance; taken from P and dP, 5e-4 and 4e-3.
    In fp32, delta from O (fp32 windows are two key blocks) put 12 of 200 draws past 1e-5, worst 4.6e-5;
    rowsum(P dP) / rowsum(P), none, worst 8.8e-6 (NOTES 37).
    Eight fresh inputs, each within the tolerance (in mask mode the bias gradient is zero). The torch
    backend as it runs off the CPU (plain tensor math; on CPU tensors it runs PyTorch's fused CPU
    attention, which takes delta from the output, as timm does there)."""
    skip_cuda_unless_available(backend)
    monkeypatch.setattr(lsa_module, "fused_cpu_attention", lambda t: False)
    for _ in range(8):
        qkv = make_tokens(1, 2, 1, 48, dtype, KERNEL_DEVICE)  # head_dim 16
        bias = torch.randn(48, device=KERNEL_DEVICE).to(dtype)
        check_op_against_reference(lambda q, b: lsa(q, b, (2, 1), 1, 8, pad_mode=pad_mode, backend=backend),
                                   lambda q, b: lsa_reference(q, b, (2, 1), 1, 8, pad_mode=pad_mode), [qkv, bias],
                                   dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_backward_delta_is_relative_to_the_recomputed_probabilities(dtype, backend, monkeypatch):
    """The backward recomputes P = exp(S - lse) and takes delta = rowsum(P dP) / rowsum(P), which the lse's
    rounding leaves as it is (NOTES 37). Given an lse log(2) too high, P halves and delta does not, so every
    gradient (qkv's and the padded keys' bias share) is half the true one; delta = rowsum(P dP) would halve
    too and move each dS = P (dP - delta) off that half. Triton's fp32 windows are two key blocks (a dq
    kernel computes delta), fp16 one (the dk/dv kernel does); the torch backend as it runs off the CPU."""
    monkeypatch.setattr(lsa_module, "fused_cpu_attention", lambda t: False)
    args = (9, 10, 7, 2, 0.25, "zero")  # padded at the bottom and the right: zero mode's bias gradient
    qkv = make_tokens(2, 9, 10, 192, dtype, KERNEL_DEVICE)
    bias = torch.randn(192, device=KERNEL_DEVICE).to(dtype)
    grad_out = torch.randn(2, 90, 64, device=KERNEL_DEVICE).to(dtype)
    out, lse = lsa_module.lsa_forward(qkv, bias, *args, backend)
    true_grads = lsa_module.lsa_backward(grad_out, qkv, bias, out, lse, *args, backend)
    halved_grads = lsa_module.lsa_backward(grad_out, qkv, bias, out, lse + math.log(2.0), *args, backend)
    for name, true, halved in zip(("grad_qkv", "grad_bias"), true_grads, halved_grads):
        assert true.abs().max() > 0, name
        assert_rel_close(halved, true / 2, dtype, name)


def test_triton_non_contiguous_input():
    x = make_tokens(2, 9, 10, 64, torch.float32, KERNEL_DEVICE, contiguous=False)
    assert not x.is_contiguous()
    check_module_parity(LocallyGroupedAttn(64, 2, ws=7), fused_on("triton"), x, (9, 10), torch.float32)


@pytest.mark.parametrize("batch,height,width,dim,heads,ws", SHAPES)
def test_reference_backend_matches_timm(batch, height, width, dim, heads, ws):
    x = make_tokens(batch, height, width, dim, torch.float32, "cpu")
    check_module_parity(LocallyGroupedAttn(dim, heads, ws=ws), fused_on("torch"), x, (height, width), torch.float32)


@pytest.mark.parametrize("batch,height,width,dim,heads,ws", MASK_SHAPES)
def test_reference_backend_mask_mode_matches_mmseg(batch, height, width, dim, heads, ws):
    x = make_tokens(batch, height, width, dim, torch.float32, "cpu")
    check_module_parity(MmsegMaskedAttn(dim, heads, ws=ws), fused_on("torch", "mask"), x, (height, width),
                        torch.float32)


@pytest.mark.parametrize("pad_mode,timm_class,size", [
    ("zero", LocallyGroupedAttn, (13, 9)), ("mask", MmsegMaskedAttn, (13, 9)), ("mmseg", MmsegMaskedAttn, (13, 9)),
    ("zero", LocallyGroupedAttn, (14, 9)), ("mmseg", MmsegMaskedAttn, (14, 9)), ("mmseg", MmsegMaskedAttn, (13, 7)),
])
def test_reference_function_matches_timm(pad_mode, timm_class, size):
    module = timm_class(32, 2, ws=7).double()
    x = torch.randn(2, size[0] * size[1], 32, dtype=torch.float64)
    core = lsa_reference(module.qkv(x), module.qkv.bias, size, 2, 7, module.scale, pad_mode)
    torch.testing.assert_close(module.proj(core), module(x, size))


GRADCHECK_CASES = [
    pytest.param((3, 5), 2, id="3x5-ws2"),
    pytest.param((3, 10), 9, id="3x10-ws9-128-slots"),
]


@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@pytest.mark.parametrize("size,ws", GRADCHECK_CASES)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_gradcheck_float64(backend, size, ws, pad_mode):
    """``reference`` is lsa_reference through autograd; ``torch`` and ``triton`` the op's backends."""
    # fast mode (a random projection of the Jacobian) keeps the interpreter run to seconds
    qkv = torch.randn(1, size[0] * size[1], 3 * 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    bias = torch.randn(3 * 16, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    if backend == "reference":
        def fn(q, b):
            return lsa_reference(q, b, size, 1, ws, pad_mode=pad_mode)
    else:
        def fn(q, b):
            return lsa(q, b, size, 1, ws, pad_mode=pad_mode, backend=backend)
    assert torch.autograd.gradcheck(fn, (qkv, bias), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_tiles_tile_every_window(dtype, backward):
    """Every ws and head_dim gets power-of-two blocks of at least 16 slots (tl.dot) that tile the window:
    64 slots for 16-bit dtypes (tensor cores), at most 32 and FMA_MAX_TILE_ELEMENTS a tile on the FMA
    units (fp32, fp64). That they compile and fit the GPU's shared memory is test_triton_aot's part."""
    from twins_kernels.ops.common import FMA_MAX_ROWS, FMA_MAX_TILE_ELEMENTS
    from twins_kernels.ops.lsa import lsa_tiles

    for ws in range(2, 17):
        for head_dim in range(16, 129, 8):
            tiles = lsa_tiles(ws, head_dim, dtype, backward)
            assert tiles.slots >= ws * ws and tiles.block_d >= head_dim
            for block in (tiles.block_q, tiles.block_k):
                assert block >= 16 and block & (block - 1) == 0 and tiles.slots % block == 0, (ws, head_dim, tiles)
                if dtype.itemsize == 2:
                    assert block == min(tiles.slots, 64), (ws, head_dim, tiles)
                else:
                    assert block <= FMA_MAX_ROWS and block * tiles.block_d <= FMA_MAX_TILE_ELEMENTS, (ws, head_dim, tiles)


@requires_concurrent_programs
def test_padded_bias_gradient_is_bitwise_reproducible():
    module = FusedLSA(64, 2, ws=7, backend="triton").to(KERNEL_DEVICE)
    x = make_tokens(2, 11, 13, 64, torch.float32, KERNEL_DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        module.zero_grad()
        x.grad = None
        module(x, (11, 13)).square().sum().backward()
        grads.append((module.qkv.bias.grad.clone(), x.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_reference_math_matches_the_fused_cpu_attention(dtype, pad_mode, monkeypatch):
    """The torch backend's windows attend through PyTorch's fused CPU attention on CPU and through plain
    math elsewhere (a GPU): both on CPU tensors, on a map padded at the bottom and the right, give the same
    out, lse, qkv gradient and padded positions' bias gradient."""
    qkv, bias, grad = torch.randn(2, 9 * 10, 192).to(dtype), torch.randn(192).to(dtype), torch.randn(2, 90, 64).to(dtype)
    args = (9, 10, 7, 2, 0.3, pad_mode == "mask")

    def results():
        out, lse = lsa_module._reference_forward(qkv, bias, *args)
        return out, lse, *lsa_module._reference_backward(grad, qkv, bias, out, lse, *args)

    fused = results()
    monkeypatch.setattr(lsa_module, "fused_cpu_attention", lambda t: False)
    for name, actual, expected in zip(("out", "lse", "grad_qkv", "grad_bias"), fused, results()):
        if name == "grad_bias" and pad_mode == "mask":  # masked padded keys get no gradient
            assert not actual.any() and not expected.any()
        else:
            assert actual.dtype == expected.dtype, name
            assert_rel_close(actual, expected, dtype, name)


@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
def test_torch_compile_fullgraph_matches_eager(pad_mode):
    """The custom op keeps the kernels opaque to dynamo: no graph break (fullgraph), same numbers."""
    module = FusedLSA(32, 2, ws=7, backend="triton", pad_mode=pad_mode).to(KERNEL_DEVICE)
    check_compiled_matches_eager(module, [(make_tokens(1, 9, 8, 32, torch.float32, KERNEL_DEVICE), (9, 8))],
                                 "aot_eager")


@pytest.mark.parametrize("pad_mode", ["zero", "mmseg"])
def test_torch_compile_dynamic_shapes_one_graph(pad_mode):
    """Maps padded on both sides and on one, an unpadded one, another batch: one graph (the padding is
    index arithmetic in the kernel, and mmseg mode's choice to mask is made in the op, not a branch dynamo
    would guard on). One head: the graph is the same for more, at twice the interpreter's time."""
    module = FusedLSA(32, 1, ws=7, backend="triton", pad_mode=pad_mode).to(KERNEL_DEVICE)
    inputs = [(make_tokens(batch, h, w, 32, torch.float32, KERNEL_DEVICE), (h, w))
              for batch, h, w in [(2, 9, 8), (3, 7, 14), (2, 3, 11), (2, 14, 10)]]
    check_compiled_matches_eager(module, inputs, "aot_eager", dynamic=True)


@pytest.mark.parametrize("pad_mode", ["zero", "mmseg"])
def test_torch_compile_dynamic_shapes_one_graph_for_the_attention_dropout_path(pad_mode):
    """In training with attn_drop > 0 the module runs lsa_reference, which crops by a negative padding (a new
    tensor, cropped or not) and branches on no map size: maps padded on both sides and on one and an
    unpadded one run one graph, drawing eager's dropout. (A map one window high or wide compiles another:
    the reshapes' contiguity checks guard on a dimension of size 1.)"""
    module = FusedLSA(32, 2, attn_drop=0.5, ws=7, pad_mode=pad_mode).to(KERNEL_DEVICE).train()
    inputs = [(make_tokens(batch, h, w, 32, torch.float32, KERNEL_DEVICE), (h, w))
              for batch, h, w in [(2, 9, 8), (3, 14, 21), (2, 10, 15), (2, 14, 10)]]
    check_compiled_matches_eager(module, inputs, "aot_eager", dynamic=True)


@requires_gpu
def test_torch_compile_inductor_on_gpu():
    module = FusedLSA(64, 2, ws=7).cuda()
    x = make_tokens(2, 30, 30, 64, torch.float16, "cuda").requires_grad_()
    module.half()
    compiled = torch.compile(lambda t: module(t, (30, 30)), fullgraph=True, backend="inductor")
    # inductor may add the Linears' biases in its own kernels: fp16 rounding (an ulp is 1e-3), not
    # another result, so elementwise rtol=1e-3 could fail on a correct kernel
    assert rel_err(compiled(x), module(x, (30, 30))) <= 1e-3


@pytest.mark.parametrize("pad_mode,timm_class", [("zero", LocallyGroupedAttn), ("mask", MmsegMaskedAttn)])
def test_attention_dropout_in_training_runs_the_reference(pad_mode, timm_class):
    """With attn_drop > 0 in training the fused module runs SDPA with dropout, in its pad_mode: the same
    dropout as timm's fused path draws under the same seed (the kernels have none, and must not silently
    drop it)."""
    timm_module = timm_class(32, 2, attn_drop=0.5, ws=7).to(KERNEL_DEVICE).train()
    timm_module.fused_attn = True
    fused = FusedLSA.from_module(timm_module, backend="triton", pad_mode=pad_mode)
    x = make_tokens(2, 13, 6, 32, torch.float32, KERNEL_DEVICE)  # padded at the bottom and the right
    torch.manual_seed(7)
    train_out = fused(x, (13, 6))
    torch.manual_seed(7)
    attention = lsa_reference(fused.qkv(x), fused.qkv.bias, (13, 6), 2, 7, pad_mode=pad_mode, dropout_p=0.5)
    torch.testing.assert_close(train_out, fused.proj(attention))
    if pad_mode == "zero":
        torch.manual_seed(7)
        torch.testing.assert_close(train_out, timm_module(x, (13, 6)))
    fused.eval()
    eval_out = fused(x, (13, 6))
    assert (train_out - eval_out).abs().max() > 1e-2, "dropout must change the training output"
    assert_rel_close(eval_out, timm_module.eval()(x, (13, 6)), torch.float32, "eval out")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("pad_mode", ["zero", "mask", "mmseg"])
def test_a_trace_of_the_attention_dropout_path_runs_every_map_size(pad_mode):
    """In training with attn_drop > 0 the module runs lsa_reference, which branches on no map size: traced on
    a map padded on both sides, it runs maps padded otherwise, transposed, on one side only and unpadded,
    drawing the dropout the module draws under the same seed."""
    module = FusedLSA(32, 2, attn_drop=0.5, ws=7, pad_mode=pad_mode).to(KERNEL_DEVICE).train()
    check_trace_runs_other_sizes(module, [(1, 32, 16, 24), (1, 32, 24, 16), (2, 32, 18, 10), (1, 32, 14, 10),
                                          (1, 32, 9, 14), (1, 32, 14, 21)])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
def test_a_trace_in_mmseg_mode_decides_on_each_map_whether_to_mask():
    """The op decides, on the map it runs on: traced on a map padded on both sides (masked), the trace
    runs maps padded on one side (not masked) and none as the module does."""
    module = FusedLSA(32, 2, ws=7, backend="triton", pad_mode="mmseg").to(KERNEL_DEVICE).eval()
    check_trace_runs_other_sizes(module, [(1, 32, 16, 24), (1, 32, 14, 10), (1, 32, 9, 14), (1, 32, 14, 21)])


def test_state_dict_keys_attributes_and_sharing_match_timm():
    timm_module = LocallyGroupedAttn(64, 2, attn_drop=0.1, proj_drop=0.2, ws=7)
    fused = FusedLSA(64, 2, attn_drop=0.1, proj_drop=0.2, ws=7)
    assert fused.state_dict().keys() == timm_module.state_dict().keys()
    fused.load_state_dict(timm_module.state_dict())
    for name in ("dim", "num_heads", "scale", "ws"):
        assert getattr(fused, name) == getattr(timm_module, name), name
    assert fused.attn_drop.p == 0.1 and fused.proj_drop.p == 0.2
    shared = FusedLSA.from_module(timm_module)
    assert shared.qkv.weight is timm_module.qkv.weight and shared.proj is timm_module.proj
    assert shared.state_dict().keys() == timm_module.state_dict().keys()


def test_constructor_refuses_what_timm_asserts():
    with pytest.raises(ValueError, match="ws=1"):
        FusedLSA(64, 2, ws=1)
    with pytest.raises(ValueError, match="num_heads 3"):
        FusedLSA(64, 3, ws=7)
    with pytest.raises(ValueError, match="'reflect'"):
        FusedLSA(64, 2, ws=7, pad_mode="reflect")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("heads", [4, 1], ids=["D8", "D256"])
def test_head_dim_outside_kernel_range_is_refused_by_kernel_backends(heads, backend):
    qkv = torch.randn(1, 20, 3 * 32 * (8 if heads == 1 else 1), device=KERNEL_DEVICE)
    bias = torch.randn(qkv.shape[2], device=KERNEL_DEVICE)
    if backend == "cuda" and cuda_backend_reason():
        with pytest.raises(twins_kernels.BackendUnavailableError):
            lsa(qkv, bias, (4, 5), heads, 2, backend=backend)
        return
    with pytest.raises(ValueError, match="head_dim .* is outside 16..128"):
        lsa(qkv, bias, (4, 5), heads, 2, backend=backend)


@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
def test_reference_backend_takes_any_head_dim(pad_mode):
    qkv = torch.randn(2, 20, 3 * 24, dtype=torch.float64)
    bias = torch.randn(3 * 24, dtype=torch.float64)
    args = (qkv, bias, (4, 5), 3, 3)  # head_dim 8
    torch.testing.assert_close(lsa(*args, pad_mode=pad_mode, backend="torch"),
                               lsa_reference(*args, pad_mode=pad_mode))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_window_above_the_kernels_is_refused_by_kernel_backends(backend):
    qkv = torch.randn(1, 18 * 17, 96, device=KERNEL_DEVICE)
    bias = torch.randn(96, device=KERNEL_DEVICE)
    if backend == "cuda" and cuda_backend_reason():
        with pytest.raises(twins_kernels.BackendUnavailableError):
            lsa(qkv, bias, (18, 17), 2, 17, backend=backend)
        return
    with pytest.raises(ValueError, match=f"ws = 17 is above 16, which the {backend} kernels support"):
        lsa(qkv, bias, (18, 17), 2, 17, backend=backend)


def test_module_with_a_window_above_the_kernels_runs_the_reference():
    """timm's module takes any ws, so a patched model may hold one: with ``auto`` it runs the reference."""
    timm_module = LocallyGroupedAttn(32, 2, ws=17).to(KERNEL_DEVICE).eval()
    fused = FusedLSA.from_module(timm_module, backend="auto")
    x = make_tokens(1, 18, 20, 32, torch.float32, KERNEL_DEVICE)
    torch.testing.assert_close(fused(x, (18, 20)), timm_module(x, (18, 20)))


@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
def test_from_module_keeps_the_eval_mode(pad_mode):
    """An eval-mode module's attention dropout is off: the fused module built from it must not train."""
    timm_module = LocallyGroupedAttn(32, 2, attn_drop=0.5, ws=7).to(KERNEL_DEVICE).eval()
    fused = FusedLSA.from_module(timm_module, backend="torch", pad_mode=pad_mode)
    assert not fused.training
    x = make_tokens(1, 7, 7, 32, torch.float32, KERNEL_DEVICE)  # no padding: both modes are timm's
    torch.testing.assert_close(fused(x, (7, 7)), timm_module(x, (7, 7)))


def test_module_input_errors_name_x():
    """The module checks its input before the qkv Linear and the dropout path: the message names x."""
    module = FusedLSA(32, 2, attn_drop=0.5, ws=7).to(KERNEL_DEVICE).train()
    with pytest.raises(ValueError, match=r"x has N=30 tokens but size=5x7 needs N=H\*W=35"):
        module(torch.randn(1, 30, 32, device=KERNEL_DEVICE), (5, 7))
    with pytest.raises(ValueError, match="x has C=16 channels, expected 32"):
        module(torch.randn(1, 35, 16, device=KERNEL_DEVICE), (5, 7))
    with pytest.raises(ValueError, match="ws must be >= 1, got 0"):
        FusedLSA(32, 2, ws=0)


@requires_gpu
def test_auto_runs_the_reference_outside_the_kernel_head_dims():
    qkv = torch.randn(1, 20, 3 * 32, device="cuda")
    bias = torch.randn(3 * 32, device="cuda")
    with twins_kernels.use_backend("auto"):
        torch.testing.assert_close(lsa(qkv, bias, (4, 5), 4, 2), lsa_reference(qkv, bias, (4, 5), 4, 2))


BAD_INPUTS = [
    ("rank", lambda q, b: lsa(q[0], b, (4, 5), 2, 2), ValueError, "(B, N, C)"),
    ("N != H*W", lambda q, b: lsa(q, b, (4, 4), 2, 2), ValueError, "N=20"),
    ("size not a pair", lambda q, b: lsa(q, b, (20,), 2, 2), ValueError, "pair"),
    ("size not ints", lambda q, b: lsa(q, b, (4.0, 5), 2, 2), TypeError, "4.0"),
    ("not 3C channels", lambda q, b: lsa(q[..., :95], b[:95], (4, 5), 2, 2), ValueError, "95 channels"),
    ("heads do not divide C", lambda q, b: lsa(q, b, (4, 5), 3, 2), ValueError, "C = 96 / 3 = 32"),
    ("num_heads not an int", lambda q, b: lsa(q, b, (4, 5), 2.0, 2), TypeError, "2.0"),
    ("num_heads zero", lambda q, b: lsa(q, b, (4, 5), 0, 2), ValueError, "num_heads must be >= 1, got 0"),
    ("num_heads a bool", lambda q, b: lsa(q, b, (4, 5), True, 2), TypeError, "True of type bool"),
    ("ws 1", lambda q, b: lsa(q, b, (4, 5), 2, 1), ValueError, "ws must be >= 2, got 1"),
    ("ws not an int", lambda q, b: lsa(q, b, (4, 5), 2, 7.0), TypeError, "7.0"),
    ("bias shape", lambda q, b: lsa(q, b[:32], (4, 5), 2, 2), ValueError, "qkv_bias has shape (32,), expected (96,)"),
    ("bias not a tensor", lambda q, b: lsa(q, b.tolist(), (4, 5), 2, 2), TypeError, "qkv_bias must be a torch.Tensor"),
    ("pad_mode", lambda q, b: lsa(q, b, (4, 5), 2, 2, pad_mode="reflect"), ValueError, "'reflect'"),
    ("dtype", lambda q, b: lsa(q.int(), b, (4, 5), 2, 2), TypeError, "torch.int32"),
    ("bias dtype", lambda q, b: lsa(q, b.int(), (4, 5), 2, 2), TypeError, "qkv_bias has dtype torch.int32"),
    ("not a tensor", lambda q, b: lsa(q.tolist(), b, (4, 5), 2, 2), TypeError, "list"),
    ("scale not a number", lambda q, b: lsa(q, b, (4, 5), 2, 2, scale="0.1"), TypeError, "'0.1'"),
    ("unknown backend", lambda q, b: lsa(q, b, (4, 5), 2, 2, backend="cudnn"), ValueError, "cudnn"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case,call,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_value(case, call, error, message, backend):
    qkv = torch.randn(2, 20, 96, device=KERNEL_DEVICE)
    bias = torch.randn(96, device=KERNEL_DEVICE)
    with twins_kernels.use_backend(backend), pytest.raises(error) as info:
        call(qkv, bias)
    assert message in str(info.value)


def test_cuda_backend_on_cpu_tensors_raises_clearly():
    with pytest.raises(twins_kernels.BackendUnavailableError, match="cuda"):
        lsa(torch.randn(1, 4, 96), torch.randn(96), (2, 2), 2, 2, backend="cuda")


@requires_gpu
def test_device_mix_raises():
    with pytest.raises(ValueError, match="cpu"):
        lsa(torch.randn(1, 20, 96, device="cuda"), torch.randn(96), (4, 5), 2, 2)


# Twins-SVT-S at 224 (stage 1 at batch 8), Twins-SVT-S at 512 x 512 (a 128 x 128 map, padded to 133),
# and the last stage at 512
GPU_SHAPES = [
    pytest.param(8, 56, 56, 64, 2, 7, id="svt-s-224-stage1-bs8"),
    pytest.param(2, 128, 128, 64, 2, 7, id="svt-s-512-stage1-128x128-padded"),
    pytest.param(4, 16, 16, 512, 16, 7, id="svt-s-512-stage4-bs4"),
    pytest.param(2, 33, 35, 128, 1, 12, id="ws12-D128"),
]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,ws", GPU_SHAPES)
def test_triton_large_shapes_on_gpu(batch, height, width, dim, heads, ws, dtype):
    x = make_tokens(batch, height, width, dim, dtype, "cuda")
    check_module_parity(LocallyGroupedAttn(dim, heads, ws=ws), fused_on("triton"), x, (height, width), dtype)
    if padded_on_both_sides(height, width, ws) or (height % ws == 0 and width % ws == 0):
        check_module_parity(MmsegMaskedAttn(dim, heads, ws=ws), fused_on("triton", "mask"), x, (height, width),
                            dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,dim,heads,ws", SHAPES + GPU_SHAPES)
def test_cuda_backend_matches_timm(batch, height, width, dim, heads, ws, dtype):
    skip_unless_available("cuda")
    x = make_tokens(batch, height, width, dim, dtype, "cuda", contiguous=False)
    check_module_parity(LocallyGroupedAttn(dim, heads, ws=ws), fused_on("cuda"), x, (height, width), dtype)
    if padded_on_both_sides(height, width, ws) or (height % ws == 0 and width % ws == 0):
        check_module_parity(MmsegMaskedAttn(dim, heads, ws=ws), fused_on("cuda", "mask"), x, (height, width), dtype)
