"""Checks and helpers shared by every op: input validation with clear messages, output allocation."""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch

from ..backend import get_backend, resolve_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_poison_outputs = False


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Fill every kernel output (and partial buffer) with NaN before the kernel runs, the Triton
    launchers' and the CUDA extension's, so an element it never writes fails parity instead of passing
    by luck with whatever the allocator left there. For tests."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def empty_output(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(tuple(shape), device=like.device, dtype=dtype or like.dtype)
    if _poison_outputs and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def check_int(value, name: str, low: int = 1, high: int | None = None) -> int:
    """An int (not a bool) in low..high: TypeError for any other type, ValueError out of range."""
    if (torch.jit.is_tracing() and isinstance(value, torch.Tensor) and value.dim() == 0
            and not value.is_floating_point()):
        # torch.jit.trace hands sizes read off a shape (timm's H, W) as 0-d tensors: checked at this value
        # (a TracerWarning says the trace keeps it), while the ops read each call's (traced_map_size)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_float(value, name: str) -> float:
    """A real number (int or float, not a bool), as a float: TypeError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}")
    return float(value)


def check_size(size, what: str = "size") -> tuple[int, int]:
    """``size`` must be a pair of positive ints (H, W), as timm passes it."""
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{what} must be a pair (H, W) of positive ints, got {size!r}")
    height, width = size
    return check_int(height, f"{what}: H"), check_int(width, f"{what}: W")


def check_tokens(x, size, *, channels: int | None = None, name: str = "x") -> tuple[int, int, int, int, int]:
    """Validate tokens (B, N, C) laid out as an H x W map; returns (B, N, C, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be tokens of shape (B, N, C), got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16 (float64 for checks)")
    batch, tokens, chans = x.shape
    height, width = check_size(size)
    if tokens != height * width:
        raise ValueError(f"{name} has N={tokens} tokens but size={height}x{width} needs N=H*W={height * width}")
    if channels is not None and chans != channels:
        raise ValueError(f"{name} has C={chans} channels, expected {channels}")
    return batch, tokens, chans, height, width


def traced_map_size(size) -> torch.Tensor | None:
    """Under torch.jit.trace, ``size`` (H, W) as a tensor, for an op's ``map_size``; None elsewhere.

    A trace records the ints handed to an op as constants: a model traced at one image size would run
    its ops at that size on every other, on tokens that do not fill that map, or fill it transposed.
    timm's sizes reach the modules as 0-d tensors computed from the input in a trace, and a tensor
    stacked from them is computed from the input too, so the traced ops read each call's size."""
    if not torch.jit.is_tracing():
        return None
    return torch.stack([side if isinstance(side, torch.Tensor) else torch.tensor(side) for side in size])


def map_size_of(op: str, tokens: int, height: int, width: int, map_size: torch.Tensor | None) -> tuple[int, int]:
    """The H x W map an op's tokens lie on: ``map_size``'s values where a trace hands one (traced_map_size),
    else ``height``, ``width``. Checked in the op, whoever calls it (a trace, torch.ops.twins_kernels):
    the kernels index the map, and would read and write past tokens that do not fill it."""
    if map_size is not None:
        height, width = map_size.tolist()
    if tokens != height * width:
        raise ValueError(f"twins_kernels::{op}: N={tokens} tokens do not fill a {height}x{width} map "
                         f"(N=H*W={height * width})")
    return height, width


def check_param(t, name: str, shape: Sequence[int], like: torch.Tensor) -> None:
    """A parameter must be a tensor of ``shape`` on the same device as the input."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}; move both to one device")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16 (float64 for checks)")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in fp32, and in fp64 for float64 inputs (what gradcheck feeds them)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_cpu_attention(t: torch.Tensor) -> bool:
    """Whether the torch backend's attention on ``t`` runs PyTorch's fused CPU kernel
    (aten._scaled_dot_product_flash_attention_for_cpu, which returns the log-sum-exp too): on CPU tensors,
    so that a patched model runs as fast as timm there; elsewhere it runs the same math in plain ops."""
    return t.device.type == "cpu"


def unit_channel_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` with adjacent elements along their last dim (a copy where not): PyTorch's fused CPU
    attention (``fused_cpu_attention``) reads q's rows as if they were, whatever their stride; public SDPA
    checks the strides before it picks that kernel, the private op the torch backend calls does not."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def scores_grad(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """The softmax backward of the references' plain-math attention: dS = P * (dP - delta) with delta =
    rowsum(P * dP) / rowsum(P) over all of a query's keys, as the Triton LSA kernels take it, not
    rowsum(dO * O) from an output rounded to its dtype (NOTES 33, 34, 37). Where dP - delta cancels,
    delta's error is amplified: dividing takes out the rounding of the lse that P is recomputed from, and
    the sums run in fp64 (a transient fp64 copy of P and of P * dP; MPS, which has no fp64, keeps the
    probabilities' dtype): fp32 sums put 2 of 200 draws of LSA's mostly padded window past 1e-5. A row of
    no probability (a cropped query) has delta 0."""
    sum_dtype = probs.dtype if probs.device.type == "mps" else torch.float64
    total = probs.sum(-1, keepdim=True, dtype=sum_dtype)
    weighted = (probs * grad_probs).sum(-1, keepdim=True, dtype=sum_dtype)
    delta = weighted / total.clamp_min(torch.finfo(total.dtype).tiny)
    return probs * (grad_probs - delta.to(probs.dtype))


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_block(limit: int, extent: int) -> int:
    """A power-of-two block of at most ``limit``, no larger than ``extent`` needs, at least 16 (tl.dot's
    minimum, and a 16-bit row's 32 bytes)."""
    return min(limit, max(16, next_pow2(extent)))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: fp32 inputs must not be rounded to tf32 (fp32 parity is 1e-5), so
    fp32 and fp64 dots are "ieee" (on the FMA units); the default suits 16-bit inputs (tensor cores)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else None


# fp32 and fp64 dots run on the FMA units ("ieee"): each thread holds its share of the operand rows
# and of the score tile in registers. Past 32 rows or 2048 elements a (rows x head_dim) tile, or with
# a full tile on 4 warps or fewer, ptxas spills up to 9 KiB per thread (falling back to 32 registers;
# seen for sm_80 and sm_90 with ptxas 12.9 and 13.0 by tests/triton_aot.py); within them, little or
# nothing.
FMA_MAX_ROWS, FMA_MAX_TILE_ELEMENTS = 32, 2048


def fma_rows(block_d: int, limit: int = FMA_MAX_ROWS) -> int:
    """Rows of a block whose dots run on the FMA units, for operand rows of block_d elements: at most
    ``limit`` and FMA_MAX_TILE_ELEMENTS a tile, at least 16 (tl.dot's minimum)."""
    return max(16, min(limit, FMA_MAX_TILE_ELEMENTS // block_d))


def fma_warps(rows: int, block_d: int) -> int:
    """Warps for an FMA-path program with (rows x block_d) operand tiles: 8 for a full tile, else 4."""
    return 8 if rows * block_d >= FMA_MAX_TILE_ELEMENTS else 4


def scalar_arg(value: float, like: torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """A float for a Triton kernel accumulating in ``dtype`` (read there with ``scalar_value``): a one-
    element tensor for fp64, which a float argument (fp32 to Triton) would round, else the float itself,
    which costs no allocation and no fill kernel a call."""
    if dtype == torch.float64:
        return torch.full((1,), value, device=like.device, dtype=dtype)
    return float(value)


def launch_device(t: torch.Tensor):
    """A context that makes ``t``'s GPU current, so kernels launch on the right device and stream."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # tl.dot needs 16 along each dimension; 128 bounds the registers


_cuda_poisons = False  # what the extension was last told (csrc/outputs.h)


def cuda_ops():
    """torch.ops.twins_kernels_cuda, registered by loading the CUDA extension, told whether to poison
    its outputs (``poisoned_outputs``) when that changed since it was last told."""
    global _cuda_poisons
    import twins_kernels._C  # noqa: F401

    ops = torch.ops.twins_kernels_cuda
    if _cuda_poisons != _poison_outputs:
        ops.set_poison_outputs(_poison_outputs)
        _cuda_poisons = _poison_outputs
    return ops


def op_backend(x: torch.Tensor, requested: str) -> str:
    """The backend a call on ``x`` runs on: the request resolved (a backend that cannot run raises
    even for an empty batch), and the reference for an empty batch, which PyTorch's own layers take:
    it returns the empty output and zero parameter gradients, where a kernel launch would have no
    blocks (an invalid configuration for a CUDA kernel)."""
    backend = resolve_backend(requested or None, x.device)
    return "torch" if x.numel() == 0 else backend


def call_choice(backend: str | None) -> str:
    """The backend choice a call runs under: its own, else the ambient one, read as the call is made, and
    kept for its backward. Autograd runs a CUDA backward on its own device thread, where the forward
    thread's ``use_backend`` context does not apply: left empty, the backward would run on whatever is
    ambient there. Under torch.compile the ambient choice is read as the graph is traced, forward and
    backward alike, and dynamo guards on it: a later ``set_backend`` compiles the graph again (read
    inside the op instead, it would reach the compiled forward and not its backward)."""
    return backend or get_backend()


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def needs_dispatcher(args) -> bool:
    """Whether a call with ``args`` must go through its custom op rather than straight to the op's
    Python implementation: while torch.compile, torch.export or torch.jit traces it; under a torch.func
    transform (vmap runs the op once per sample through the dispatcher); under a torch function or
    dispatch mode (FakeTensorMode, FlopCounterMode, ``with torch.device(...)``); with the profiler on,
    so that profiles name the op; and on tensors other than plain CPU and CUDA ones (fake, functional or
    meta tensors, subclasses), which only the dispatcher routes to the op's fake implementation or to
    the subclass. A torch without one of the private checks used here takes the dispatcher always."""
    try:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.autograd._profiler_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0):
            return True
    except AttributeError:
        return True
    return any(isinstance(a, torch.Tensor)
               and (type(a) not in _PLAIN_TENSOR_TYPES or a.device.type not in ("cpu", "cuda")) for a in args)


def autocast_neutral(op):
    """``op`` (an op's Python implementation, forward or backward) run with autocast off for its first
    argument's device: its math then follows its inputs' dtypes on every backend, as the kernels' does and
    as its fake says. Left on, the PyTorch reference's convs and matmuls would run in autocast's dtype
    (PEG's conv backward then fails on the mixed dtypes). The modules follow autocast where timm's do.
    The signature, its annotations evaluated where ``op`` was defined, is what custom_op reads."""
    @functools.wraps(op)
    def run(*args, **kwargs):
        device_type = args[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return op(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)

    run.__signature__ = inspect.signature(op, eval_str=True)
    return run


def kernel_op_entry(forward_op, forward, setup_context, backward):
    """Register ``backward`` (with ``setup_context``) as the autograd formula of ``forward_op``, the custom
    op of the Python function ``forward``, and return the function the op's callers call.

    It calls the custom op where a tracer or a mode must see the op (``needs_dispatcher``). In plain
    eager mode it runs ``forward`` through a torch.autograd.Function with the very same formula: the
    custom op's dispatch and its generated autograd wrapper cost 60-200 us of Python a forward and
    backward on this project's CPU machine (as much as timm's whole PosConv on a small map; NOTES 32),
    which an eager model pays once per op and layer, on the host however fast the GPU is."""
    forward_op.register_autograd(backward, setup_context=setup_context)

    def eager_forward(ctx, *args):
        # ctx in forward, not a separate setup_context: for one of those, apply binds the arguments to
        # forward's signature with inspect on every call, which costs as much as it saves
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    eager = type(forward.__name__, (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(backward)})

    def call(*args):
        return forward_op(*args) if needs_dispatcher(args) else eager.apply(*args)

    return call


def kernel_backward_entry(backward_op, backward, op: str):
    """Give ``backward_op`` (the custom op of the Python function ``backward``) an autograd formula that
    raises a clear error, and return the function an autograd formula calls: the custom op where the
    dispatcher is needed (``needs_dispatcher``) or the backward itself builds a graph (create_graph=True,
    so that the gradient of the gradient raises that error), else ``backward`` directly.

    The kernels' backwards have no backward of their own, and PyTorch's message for a missing formula
    asks the user to register one."""
    def double_backward(ctx, *grads):
        raise NotImplementedError(
            f"twins_kernels: {op} has no double backward (the gradient of its gradient, which a gradient "
            f"penalty through autograd.grad(..., create_graph=True) needs); run timm's modules for that "
            f"(twins_kernels.unpatch_model)")

    backward_op.register_autograd(double_backward, setup_context=lambda ctx, inputs, output: None)

    def call(*args):
        return backward_op(*args) if torch.is_grad_enabled() or needs_dispatcher(args) else backward(*args)

    return call


def reference_outside_kernels(requested: str, backend: str, what: str) -> str:
    """For a call outside what the ``backend`` kernels support (``what`` says how): the reference
    ("torch") where the choice was ``auto``; naming a kernel backend raises a ValueError saying so."""
    if (requested or get_backend()).lower() == "auto":
        return "torch"
    raise ValueError(f"{what}, which the {backend} kernels support; use backend='torch'")


def attention_backend(x: torch.Tensor, chans: int, num_heads: int, requested: str) -> str:
    """The backend an attention op runs on (``op_backend``): the kernel backends need head_dim in
    16..128 (``auto`` runs the reference outside it; naming a kernel backend raises), and the CUDA
    extension has no fp64 kernels (float64 runs the reference)."""
    backend = op_backend(x, requested)
    if backend == "torch":
        return backend
    head_dim = chans // num_heads
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return reference_outside_kernels(
            requested, backend,
            f"head_dim = C / num_heads = {chans} / {num_heads} = {head_dim} is outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if backend == "cuda" and x.dtype == torch.float64:
        return "torch"
    return backend
