"""PEG parity with timm's PosConv on every backend, gradcheck, torch.compile, bad input."""
import importlib

import pytest
import torch
from timm.models.twins import PosConv

import twins_kernels
from twins_kernels import FusedPEG
from twins_kernels.ops import peg, peg_reference

from conftest import (HAS_GPU, KERNEL_DEVICE, KERNEL_DTYPES, requires_concurrent_programs, requires_gpu,
                      skip_cuda_unless_available, skip_unless_available)
from parity import (DTYPE_IDS, assert_rel_close, check_compiled_matches_eager, check_module_parity,
                    check_op_against_reference, make_tokens)

# (B, H, W, C): Twins' real stage widths, and odd sizes: batch 1, a single row, a prime token count,
# channels that are not a multiple of any block
SHAPES = [
    pytest.param(2, 7, 7, 64, id="svt-s-stage1-C64"),
    pytest.param(1, 5, 6, 128, id="C128"),
    pytest.param(1, 4, 4, 256, id="C256"),
    pytest.param(1, 3, 3, 512, id="C512"),
    pytest.param(1, 2, 2, 1024, id="C1024"),
    pytest.param(1, 1, 31, 24, id="H1-W31"),
    pytest.param(2, 13, 1, 40, id="W1"),
    pytest.param(1, 1, 1, 16, id="1x1"),
    pytest.param(3, 1, 29, 67, id="prime-N29-C67"),
    pytest.param(1, 9, 11, 100, id="odd-9x11-C100"),
    pytest.param(1, 2, 40, 128, id="W40-two-row-tiles"),  # rows of 32-token tiles: a seam in each row
]


def fused_on(backend):
    return lambda module: FusedPEG.from_module(module, backend=backend)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,chans", SHAPES)
def test_triton_matches_timm(batch, height, width, chans, dtype):
    x = make_tokens(batch, height, width, chans, dtype, KERNEL_DEVICE)
    check_module_parity(PosConv(chans, chans), fused_on("triton"), x, (height, width), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_triton_weight_gradient_blocks_of_several_rows(dtype, monkeypatch):
    """B*H rows past the weight gradient's row blocks (512: no map on the CPU reaches that): here 3 blocks
    of 4 rows, the last one of 2."""
    monkeypatch.setattr(importlib.import_module("twins_kernels.ops.peg"), "WEIGHT_GRAD_PROGRAMS", 3)
    x = make_tokens(2, 5, 7, 24, dtype, KERNEL_DEVICE)
    check_module_parity(PosConv(24, 24), fused_on("triton"), x, (5, 7), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
def test_triton_non_contiguous_input(dtype):
    x = make_tokens(2, 6, 9, 48, dtype, KERNEL_DEVICE, contiguous=False)
    assert not x.is_contiguous()
    check_module_parity(PosConv(48, 48), fused_on("triton"), x, (6, 9), dtype)


@pytest.mark.parametrize("batch,height,width,chans", SHAPES)
def test_reference_backend_matches_timm(batch, height, width, chans):
    x = make_tokens(batch, height, width, chans, torch.float32, "cpu")
    check_module_parity(PosConv(chans, chans), fused_on("torch"), x, (height, width), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_without_bias_the_residual_stays(backend):
    """bias=None (the functional op takes it; timm's PosConv always has one): x + the conv alone, against
    F.conv2d written out here (peg_reference is the torch backend's own forward)."""
    skip_cuda_unless_available(backend)
    def expected(x, weight):
        feat = x.transpose(1, 2).reshape(2, 16, 5, 6)
        return (feat + torch.nn.functional.conv2d(feat, weight, None, 1, 1, groups=16)).flatten(2).transpose(1, 2)

    x = make_tokens(2, 5, 6, 16, torch.float32, KERNEL_DEVICE)
    weight = torch.randn(16, 1, 3, 3, device=KERNEL_DEVICE)
    check_op_against_reference(lambda x, weight: peg(x, weight, None, (5, 6), backend=backend), expected,
                               [x, weight], torch.float32)


@pytest.mark.parametrize("stride", [2, 3])
def test_stride_above_one_runs_the_reference(stride):
    x = make_tokens(2, 9, 7, 32, torch.float32, KERNEL_DEVICE)
    module = PosConv(32, 32, stride=stride)
    check_module_parity(module, fused_on("triton"), x, (9, 7), torch.float32)


def test_grouped_in_chans_runs_the_reference():
    x = make_tokens(1, 5, 5, 64, torch.float32, "cpu")
    check_module_parity(PosConv(64, 32, stride=2), fused_on("torch"), x, (5, 5), torch.float32)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("batch,height,width,chans", SHAPES + [
    pytest.param(8, 56, 56, 64, id="svt-s-224-stage1-bs8"),
    pytest.param(4, 128, 128, 64, id="svt-s-512-stage1-bs4"),
    pytest.param(2, 32, 32, 512, id="svt-s-512-stage3-bs2"),
])
def test_cuda_backend_matches_timm(batch, height, width, chans, dtype):
    skip_unless_available("cuda")
    x = make_tokens(batch, height, width, chans, dtype, "cuda")
    check_module_parity(PosConv(chans, chans), fused_on("cuda"), x, (height, width), dtype)
    x = make_tokens(batch, height, width, chans, dtype, "cuda", contiguous=False)
    check_module_parity(PosConv(chans, chans), fused_on("cuda"), x, (height, width), dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_triton_large_shapes_on_gpu(dtype):
    for batch, height, width, chans in [(64, 56, 56, 64), (16, 64, 64, 128), (16, 32, 32, 256)]:
        x = make_tokens(batch, height, width, chans, dtype, "cuda")
        check_module_parity(PosConv(chans, chans), fused_on("triton"), x, (height, width), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_float64(backend):
    # fast mode (a random projection of the Jacobian) keeps the interpreter run to seconds
    x = torch.randn(2, 12, 3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: peg(*a, size=(3, 4), backend=backend), (x, weight, bias),
                                    fast_mode=True)


@requires_concurrent_programs
def test_weight_grad_is_bitwise_reproducible():
    x = make_tokens(3, 11, 13, 40, torch.float32, KERNEL_DEVICE).requires_grad_()
    module = FusedPEG(40, 40, backend="triton").to(KERNEL_DEVICE)
    grads = []
    for _ in range(2):
        module.zero_grad()
        module(x, (11, 13)).square().sum().backward()
        grads.append((module.proj[0].weight.grad.clone(), module.proj[0].bias.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """The custom ops keep the kernels opaque to dynamo: no graph break, eager's output and gradients (on a
    GPU under inductor, whose generated code asserts the strides the ops' fakes promise)."""
    module = FusedPEG(32, 32, backend=backend).to(KERNEL_DEVICE)
    x = make_tokens(2, 5, 7, 32, torch.float32, KERNEL_DEVICE)
    # inductor may fuse the residual and bias adds differently: fp32 rounding, not another result
    check_compiled_matches_eager(module, [(x, (5, 7))], "inductor" if HAS_GPU else "aot_eager", rtol=1e-4, atol=1e-4)


def test_torch_compile_dynamic_shapes_one_graph():
    module = FusedPEG(32, 32, backend="triton").to(KERNEL_DEVICE)
    inputs = [(make_tokens(batch, h, w, 32, torch.float32, KERNEL_DEVICE), (h, w))
              for batch, h, w in [(2, 5, 7), (3, 2, 9), (2, 6, 6)]]
    check_compiled_matches_eager(module, inputs, "aot_eager", dynamic=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameters_of_another_dtype_are_used_in_x_dtype(backend):
    """fp16 tokens through a module with fp32 parameters (as autocast hands them over): the same on every
    backend, with gradients in the parameters' dtype."""
    module = FusedPEG(16, 16, backend=backend).to(KERNEL_DEVICE)
    conv = module.proj[0]
    x = make_tokens(2, 5, 7, 16, torch.float16, KERNEL_DEVICE).requires_grad_()
    out = module(x, (5, 7))
    grad = torch.randn_like(out)
    out.backward(grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    expected = peg_reference(x64, w64, b64, (5, 7))
    expected.backward(grad.double())
    assert out.dtype == torch.float16 and conv.weight.grad.dtype == conv.bias.grad.dtype == torch.float32
    for actual, wanted, what in ((out, expected, "out"), (x.grad, x64.grad, "grad x"),
                                 (conv.weight.grad, w64.grad, "grad weight"), (conv.bias.grad, b64.grad, "grad bias")):
        assert_rel_close(actual, wanted, torch.float16, what)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_under_autocast_runs_and_returns_in_autocasts_dtype_as_timm(backend):
    """timm's conv runs in autocast's dtype and so returns it (fp32 tokens in, 16-bit out); so does the module,
    forward and backward, on every backend."""
    torch.manual_seed(0)
    timm_module = PosConv(16, 16).to(KERNEL_DEVICE)
    fused = FusedPEG.from_module(timm_module, backend=backend)
    x = make_tokens(2, 5, 7, 16, torch.float32, KERNEL_DEVICE)
    grad = torch.randn(2, 35, 16, device=KERNEL_DEVICE)
    results = []
    for module in (timm_module, fused):
        leaf = x.detach().clone().requires_grad_()
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
            out = module(leaf, (5, 7))
        out.backward(grad.to(out.dtype))
        results.append((out, leaf.grad, module.proj[0].weight.grad.clone()))
        module.zero_grad()
    for actual, wanted, what in zip(results[1], results[0], ("out", "grad x", "grad weight")):
        assert actual.dtype == wanted.dtype, what
        assert_rel_close(actual, wanted, torch.bfloat16, what)
    assert results[1][0].dtype == torch.bfloat16


def test_state_dict_keys_and_sharing_match_timm():
    timm_module = PosConv(64, 64)
    fused = FusedPEG(64, 64)
    assert fused.state_dict().keys() == timm_module.state_dict().keys() == {"proj.0.weight", "proj.0.bias"}
    fused.load_state_dict(timm_module.state_dict())
    shared = FusedPEG.from_module(timm_module)
    assert shared.proj[0].weight is timm_module.proj[0].weight
    assert shared.no_weight_decay() == timm_module.no_weight_decay()


def test_reference_matches_timm_on_plain_tensors():
    x = torch.randn(2, 20, 8)
    module = PosConv(8, 8)
    expected = module(x, (4, 5))
    actual = peg_reference(x, module.proj[0].weight, module.proj[0].bias, (4, 5))
    torch.testing.assert_close(actual, expected)


BAD_INPUTS = [
    ("rank", lambda x, w, b: peg(x[0], w, b, (4, 5)), ValueError, "(B, N, C)"),
    ("N != H*W", lambda x, w, b: peg(x, w, b, (4, 4)), ValueError, "N=20"),
    ("size not a pair", lambda x, w, b: peg(x, w, b, (20,)), ValueError, "pair"),
    ("size not ints", lambda x, w, b: peg(x, w, b, (4.0, 5)), TypeError, "4.0"),
    # (a 0-d tensor, as torch.jit.trace hands timm's sizes, is read as its value under a trace only)
    ("size a tensor", lambda x, w, b: peg(x, w, b, (torch.tensor(4), 5)), TypeError, "of type Tensor"),
    ("size not positive", lambda x, w, b: peg(x[:, :0], w, b, (0, 5)), ValueError, "H must be >= 1"),
    ("channel mismatch", lambda x, w, b: peg(x, w[:4], b[:4], (4, 5)), ValueError, "C_out (4) must equal C (8)"),
    ("weight shape", lambda x, w, b: peg(x, w[..., :2], b, (4, 5)), ValueError, "weight has shape (8, 1, 3, 2)"),
    ("bias shape", lambda x, w, b: peg(x, w, b[:3], (4, 5)), ValueError, "bias has shape (3,)"),
    ("weight not a tensor", lambda x, w, b: peg(x, w.tolist(), b, (4, 5)), TypeError, "weight must be a torch.Tensor"),
    ("weight rank", lambda x, w, b: peg(x, w[0], b, (4, 5)), ValueError, "got shape (1, 3, 3)"),
    ("weight with no channel", lambda x, w, b: peg(x, w[:0], b, (4, 5)), ValueError, "C_out >= 1, got shape (0, 1, 3, 3)"),
    ("dtype", lambda x, w, b: peg(x.int(), w, b, (4, 5)), TypeError, "torch.int32"),
    ("not a tensor", lambda x, w, b: peg(x.tolist(), w, b, (4, 5)), TypeError, "list"),
    ("stride", lambda x, w, b: peg(x, w, b, (4, 5), stride=0), ValueError, "stride must be >= 1, got 0"),
    ("stride not an int", lambda x, w, b: peg(x, w, b, (4, 5), stride=1.0), TypeError, "stride must be an int"),
    ("stride a bool", lambda x, w, b: peg(x, w, b, (4, 5), stride=True), TypeError, "True of type bool"),
    ("unknown backend", lambda x, w, b: peg(x, w, b, (4, 5), backend="cudnn"), ValueError, "cudnn"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case,call,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_value(case, call, error, message, backend):
    x = torch.randn(2, 20, 8, device=KERNEL_DEVICE)
    weight = torch.randn(8, 1, 3, 3, device=KERNEL_DEVICE)
    bias = torch.randn(8, device=KERNEL_DEVICE)
    with twins_kernels.use_backend(backend), pytest.raises(error, match=None) as info:
        call(x, weight, bias)
    assert message in str(info.value)


@requires_gpu
def test_device_mix_raises():
    x = torch.randn(2, 20, 8, device="cuda")
    with pytest.raises(ValueError, match="cpu"):
        peg(x, torch.randn(8, 1, 3, 3), torch.randn(8), (4, 5))


def test_cuda_backend_on_cpu_tensors_raises_clearly():
    x = torch.randn(1, 4, 8)
    with pytest.raises(twins_kernels.BackendUnavailableError, match="cuda"):
        peg(x, torch.randn(8, 1, 3, 3), torch.randn(8), (2, 2), backend="cuda")
