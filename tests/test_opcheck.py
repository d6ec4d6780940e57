"""torch.library's own checks of every registered op, forward and backward, on every backend: the schema,
the fake (meta) implementation against the real outputs (shapes, dtypes and strides: torch.compile's
generated code asserts the fake's strides), and the autograd registration of the forward ops.

The backward ops are checked on their own: the forward ops' checks reach them only through an autograd
graph, where a stride the fake does not promise may go unnoticed until inductor's code asserts it.

Eager calls run the same Python functions without the dispatcher (``common.kernel_op_entry``); the
last tests check that both ways compute the same, and that tracers and modes still see the ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from twins_kernels.ops.gsa import (
    gsa_attention_backward_op,
    gsa_attention_forward_op,
    gsa_subsample_backward_op,
    gsa_subsample_forward_op,
)
from twins_kernels.ops.lsa import lsa_backward_op, lsa_forward_op
from twins_kernels.ops.peg import peg_backward_op, peg_forward_op

from twins_kernels.testing import make_tokens

from conftest import KERNEL_DEVICE, SMALL_FUSED_KINDS, skip_cuda_unless_available, small_fused_module

BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, device=KERNEL_DEVICE, requires_grad=requires_grad)


def check_forward_and_backward(forward_op, forward_args, backward_op, backward_args):
    """opcheck the forward op on inputs that require grad, then the backward op on plain ones built by
    backward_args(forward outputs)."""
    torch.library.opcheck(forward_op, forward_args)
    with torch.no_grad():
        outputs = forward_op(*(a.detach() if isinstance(a, torch.Tensor) else a for a in forward_args))
    torch.library.opcheck(backward_op, backward_args(outputs))


@BACKENDS
def test_peg_ops(backend):
    skip_cuda_unless_available(backend)
    x, weight, bias = randn(2, 35, 24, requires_grad=True), randn(24, 1, 3, 3, requires_grad=True), randn(24)
    check_forward_and_backward(
        peg_forward_op, (x, weight, bias, 5, 7, 1, backend),
        peg_backward_op, lambda out: (torch.randn_like(out), x.detach(), weight.detach(), 5, 7, 1, backend))


@BACKENDS
def test_lsa_ops(backend):
    skip_cuda_unless_available(backend)
    qkv, bias = randn(2, 5 * 6, 96, requires_grad=True), randn(96, requires_grad=True)  # C 32, 2 heads
    for pad_mode in ("zero", "mask", "mmseg"):
        shape = (5, 6, 4, 2, 0.25, pad_mode, backend)
        check_forward_and_backward(
            lsa_forward_op, (qkv, bias, *shape),
            lsa_backward_op, lambda outputs: (torch.randn_like(outputs[0]), qkv.detach(), bias.detach(), *outputs,
                                              *shape))


@BACKENDS
def test_gsa_attention_ops(backend):
    skip_cuda_unless_available(backend)
    q, kv = randn(2, 7, 32, requires_grad=True), randn(2, 3, 64, requires_grad=True)
    check_forward_and_backward(
        gsa_attention_forward_op, (q, kv, 2, 0.25, backend),
        gsa_attention_backward_op, lambda outputs: (torch.randn_like(outputs[0]), q.detach(), kv.detach(), *outputs,
                                                    2, 0.25, backend))


@BACKENDS
def test_gsa_subsample_ops(backend):
    skip_cuda_unless_available(backend)
    x, sr_weight = randn(1, 15, 16, requires_grad=True), randn(16, 16, 2, 2, requires_grad=True)
    norm_weight = randn(16, requires_grad=True)
    args = (x, sr_weight, randn(16, requires_grad=True), norm_weight, randn(16, requires_grad=True), 3, 5, 2, 1e-5,
            backend)
    check_forward_and_backward(
        gsa_subsample_forward_op, args,
        gsa_subsample_backward_op, lambda outputs: (torch.randn_like(outputs[0]), x.detach(), sr_weight.detach(),
                                                    norm_weight.detach(), *outputs[1:], 3, 5, 2, backend))


@BACKENDS
def test_forward_ops_run_on_the_map_size_a_trace_hands_them_and_check_the_tokens_fill_it(backend):
    """A torch.jit.trace hands the forward ops the map size as a tensor (common.traced_map_size) besides the
    ints recorded at the traced size: they run on the tensor's. Whoever calls them, tokens that do not
    fill the map they run on raise, naming both: the kernels would index past them."""
    skip_cuda_unless_available(backend)
    x, qkv = randn(2, 35, 24), randn(2, 35, 96)  # a 5x7 map; LSA at C 32, 2 heads
    peg_args, lsa_args = (randn(24, 1, 3, 3), randn(24)), (randn(96),)
    subsample_args = (randn(24, 24, 2, 2), randn(24), randn(24), randn(24))
    ops = {"peg_forward": lambda *size: peg_forward_op(x, *peg_args, *size[:2], 1, backend, *size[2:]),
           "lsa_forward": lambda *size: lsa_forward_op(qkv, *lsa_args, *size[:2], 4, 2, 0.25, "zero", backend,
                                                       *size[2:])[0],
           "gsa_subsample_forward": lambda *size: gsa_subsample_forward_op(x, *subsample_args, *size[:2], 2, 1e-5,
                                                                           backend, *size[2:])[0]}
    for name, op in ops.items():
        expected = op(5, 7)
        assert not torch.allclose(op(7, 5), expected), name  # the same tokens on the transposed map
        assert torch.equal(op(7, 5, torch.tensor([5, 7])), expected), name
        for size in [(6, 6), (5, 7, torch.tensor([6, 6]))]:
            with pytest.raises(ValueError, match=rf"twins_kernels::{name}: N=35 tokens do not fill a 6x6 map "
                                                 rf"\(N=H\*W=36\)"):
                op(*size)


class SeenOps(TorchDispatchMode):
    """Runs every op it is handed unchanged and notes its name: a mode sees the ops the dispatcher
    routes, so an op that skipped the dispatcher would be missing here."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


FUSED_OPS = {"peg": ["peg"], "lsa": ["lsa"], "gsa-sr4": ["gsa_subsample", "gsa_attention"],
             "gsa-sr1": ["gsa_attention"]}


@pytest.mark.parametrize("kind", SMALL_FUSED_KINDS)
def test_eager_calls_compute_what_the_custom_ops_compute(kind):
    """A module's eager forward and backward (the ops' functions through an autograd.Function) and the same
    under a dispatch mode (through the custom ops, which the mode must see, forward and backward): the
    same output and gradients, bit for bit."""
    module = small_fused_module(kind, "triton")
    x = make_tokens(2, 9, 10, 32, torch.float32, KERNEL_DEVICE).requires_grad_()

    def forward_and_backward():
        out = module(x, (9, 10))
        return (out, *torch.autograd.grad(out.square().sum(), (x, *module.parameters())))

    eager = forward_and_backward()
    with SeenOps() as mode:
        dispatched = forward_and_backward()
    expected = {f"twins_kernels::{op}_{part}" for op in FUSED_OPS[kind] for part in ("forward", "backward")}
    assert expected <= mode.names
    for a, b in zip(eager, dispatched, strict=True):
        assert torch.equal(a, b)


def test_eager_calls_skip_the_dispatcher_and_tracers_do_not(monkeypatch):
    """A plain eager forward and backward call no custom op. The custom ops run where something must see
    them: a backward that builds a graph (create_graph=True: its own backward must raise, naming the op),
    the profiler (which names the ops it sees), a torch function mode (a default device), torch.func.vmap
    and meta tensors (the fake implementation)."""
    from twins_kernels.ops import peg

    called = []
    call = type(peg_forward_op).__call__

    def noting_call(op, *args, **kwargs):
        called.append(op)
        return call(op, *args, **kwargs)

    monkeypatch.setattr(type(peg_forward_op), "__call__", noting_call)
    x, weight = torch.randn(3, 20, 16, requires_grad=True), torch.randn(16, 1, 3, 3)

    def calls(run):
        called.clear()
        run()
        return called[:]

    assert calls(lambda: peg(x, weight, size=(4, 5)).sum().backward()) == []
    assert calls(lambda: torch.autograd.grad(peg(x, weight, size=(4, 5)).square().sum(), x,
                                             create_graph=True)) == [peg_backward_op]

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        peg(x, weight, size=(4, 5)).sum().backward()
    assert {"twins_kernels::peg_forward", "twins_kernels::peg_backward"} <= {event.name for event in profile.events()}

    with torch.device("cpu"):
        assert calls(lambda: peg(x, weight, size=(4, 5))) == [peg_forward_op]

    def batched():
        out = torch.func.vmap(lambda t: peg(t, weight, size=(4, 5)))(x.detach().unsqueeze(1))
        torch.testing.assert_close(out.squeeze(1), peg(x.detach(), weight, size=(4, 5)))

    assert calls(batched)[0] is peg_forward_op

    def on_meta():
        out = peg(x.detach().to("meta"), weight.to("meta"), size=(4, 5))
        assert out.device.type == "meta" and out.shape == x.shape

    assert calls(on_meta) == [peg_forward_op]
