"""Drop-in nn.Modules: same constructors, forward signatures, attributes and state_dict keys as timm's
``PosConv``, ``LocallyGroupedAttn`` and ``GlobalSubSampleAttn``, with the fused ops underneath.

Each takes an extra keyword ``backend`` (None = the ambient choice, see ``twins_kernels.backend``),
and ``from_module(m)`` builds one that shares ``m``'s parameters (no copy), which is what
``patch_model`` uses.
"""
from __future__ import annotations

import torch
from torch import nn

from .backend import check_backend_choice
from .ops.common import check_int, check_tokens
from .ops.gsa import gsa_attention, gsa_attention_reference, gsa_subsample
from .ops.lsa import check_pad_mode, lsa, lsa_reference
from .ops.peg import peg


def _sharing(cls, module: nn.Module, attributes, backend: str | None, **settings):
    """A ``cls`` built without ``__init__`` that takes ``attributes`` (submodules, so their parameters,
    and settings) and its train/eval mode from ``module`` itself, plus ``backend`` and ``settings``."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.training = module.training
    for name in attributes:
        setattr(fused, name, getattr(module, name))
    fused.backend = check_backend_choice(backend, f"{cls.__name__}.from_module(backend=...)")
    for name, value in settings.items():
        setattr(fused, name, value)
    return fused


def _autocast_conv_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype where autocast is on for its device, as autocast casts a conv's input
    (every floating dtype but float64), else ``x``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class _FusedModule(nn.Module):
    """What the three fused modules share: they cannot be TorchScript, and say so."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on each submodule before it compiles any (else its error would be
        # about a Python call deep in the backend choice)
        raise RuntimeError(f"{type(self).__name__} cannot be compiled by TorchScript (torch.jit.script): its "
                           "kernels are launched from Python. torch.jit.trace records its twins_kernels ops; "
                           "torch.compile and torch.export see them too; or script the model unpatched "
                           "(twins_kernels.unpatch_model(model))")


class _PositionalEncoding(_FusedModule):
    """What FusedPEG and mmsegmentation's fused CPE share: the fused PEG at ``stride`` on ``backend``."""

    def positional_encoding(self, conv: nn.Conv2d, x: torch.Tensor, size) -> torch.Tensor:
        """The fused PEG with ``conv``'s weight and bias: under autocast it runs, and returns, in autocast's
        dtype, as a conv does."""
        return peg(_autocast_conv_input(x), conv.weight, conv.bias, size, self.stride, backend=self.backend)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, backend={self.backend or 'ambient'}"


class FusedPEG(_PositionalEncoding):
    """timm ``PosConv(in_chans, embed_dim, stride)``: depthwise 3x3 conv + bias (+ x at stride 1).

    Stride 1 with ``in_chans == embed_dim`` (every Twins model) runs the fused kernels; other
    configurations run the PyTorch reference on every backend. Under autocast it runs, and returns, in
    autocast's dtype, as timm's conv does (the residual stream of a Twins model under autocast turns
    16-bit at its first PEG); the fused op itself computes in its input's dtype.
    """

    def __init__(self, in_chans: int, embed_dim: int = 768, stride: int = 1, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 3, stride, 1, bias=True, groups=embed_dim, device=device, dtype=dtype),
        )
        self.stride = stride
        self.backend = check_backend_choice(backend, f"{type(self).__name__}(backend=...)")

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "FusedPEG":
        """A FusedPEG sharing ``module``'s ``proj`` = Sequential(Conv2d) (and so its parameters) with it."""
        # the conv's own stride: other PEG classes name the attribute differently
        return _sharing(cls, module, ("proj",), stride=module.proj[0].stride[0], backend=backend)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.positional_encoding(self.proj[0], x, size)

    def no_weight_decay(self):
        return ['proj.%d.weight' % i for i in range(4)]


class _FusedAttention(_FusedModule):
    """What the fused attention modules share: timm's ``fused_attn`` flag, read-only in effect, and the
    attention dropout that, in training, routes the attention to the reference."""

    @property
    def attention_dropout(self) -> float:
        """The dropout probability of the attention weights (timm's ``attn_drop.p``)."""
        return self.attn_drop.p

    @property
    def fused_attn(self) -> bool:
        """Always True. timm's attention modules choose SDPA or an explicit softmax with this flag (the
        same attention); the fused modules always run their fused op. Kept for code that reads or sets it."""
        return True

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        if not value:  # silently keeping the fused op would hide that nothing changed
            raise ValueError(f"{type(self).__name__} always runs its fused attention: fused_attn=False (timm's "
                             "explicit softmax, whose attn_drop module sees the attention map) needs timm's own "
                             "module: unpatch_model(model), or patch_model without this kind in ops")


class _SubsampledAttention(_FusedAttention):
    """What FusedGSA and mmsegmentation's fused GSA share: the attention of every token to the keys and
    values of the map sub-sampled by ``sr`` and ``norm`` (None: all tokens), with their own projections."""

    def subsampled_attention(self, x: torch.Tensor, size, project_q, project_kv) -> torch.Tensor:
        """(B, N, C) attention output, before the output projection, of tokens ``x`` on a map of ``size``;
        ``project_q``/``project_kv`` map tokens to q (B, N, C) and kv (B, M, 2C) (keys, then values)."""
        kv_tokens = x
        if self.sr is not None:
            kv_tokens = gsa_subsample(x, size, self.sr.weight, self.sr.bias, self.norm.weight, self.norm.bias,
                                      self.sr_ratio, self.norm.eps, backend=self.backend)
        q, kv = project_q(x), project_kv(kv_tokens)
        if self.training and self.attention_dropout > 0:
            return gsa_attention_reference(q, kv, self.num_heads, self.scale, dropout_p=self.attention_dropout)
        return gsa_attention(q, kv, self.num_heads, self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, backend={self.backend or 'ambient'}"


class FusedGSA(_SubsampledAttention):
    """timm ``GlobalSubSampleAttn(dim, num_heads, attn_drop, proj_drop, sr_ratio)``: every token attends to
    keys and values of the map sub-sampled by ``LayerNorm(Conv2d(kernel = stride = sr_ratio))``;
    sr_ratio 1 (no ``sr``/``norm``) is global attention over all N tokens.

    The q, kv and proj Linears stay nn.Linear; the sub-sampling and the attention core run the fused ops
    (``twins_kernels.ops.gsa``). In training with attention dropout (``attn_drop.p > 0``) the attention
    core runs the PyTorch reference (SDPA with dropout) instead: the kernels have no dropout, and leaving
    it out would silently train a different model.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_drop: float = 0., proj_drop: float = 0., sr_ratio: int = 1,
                 device=None, dtype=None, backend: str | None = None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} should be divided by num_heads {num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=True, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
        else:
            self.sr = None
            self.norm = None
        self.backend = check_backend_choice(backend, f"{type(self).__name__}(backend=...)")

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "FusedGSA":
        """A FusedGSA sharing ``module``'s submodules (and so its parameters) with it."""
        return _sharing(cls, module, ("dim", "num_heads", "scale", "q", "kv", "attn_drop", "proj", "proj_drop",
                                      "sr_ratio", "sr", "norm"), backend=backend)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        check_tokens(x, size, channels=self.dim)  # naming x, not the sub-sampling's weight or a Linear's
        return self.proj_drop(self.proj(self.subsampled_attention(x, size, self.q, self.kv)))


class FusedLSA(_FusedAttention):
    """timm ``LocallyGroupedAttn(dim, num_heads, attn_drop, proj_drop, ws)``: self-attention inside
    ws x ws windows of the map, padded right/bottom to multiples of ws.

    The qkv and proj Linears stay nn.Linear; the attention core in between runs the fused op
    (``twins_kernels.ops.lsa``), which reads the windows straight from the qkv output. ``pad_mode``:
    "zero" is timm's (padded positions are zero tokens, so their keys are the qkv bias), "mask" what
    mmsegmentation means (valid queries ignore the padded keys), "mmseg" what its code does (its mask,
    sliced with ``-pad_b:`` and ``-pad_r:``, masks nothing if one side only is padded: "mask" where both
    are, else "zero"; for parity with mmsegmentation's checkpoints and outputs). In training with
    attention dropout (``attn_drop.p > 0``) the attention runs the PyTorch reference (SDPA with
    dropout) instead: the kernels have no dropout, and leaving it out would silently train a different
    model.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_drop: float = 0., proj_drop: float = 0., ws: int = 1,
                 device=None, dtype=None, backend: str | None = None, pad_mode: str = "zero"):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if check_int(ws, "ws") == 1:
            raise ValueError("ws=1 is global attention over all tokens: use FusedGSA with sr_ratio=1")
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} should be divided by num_heads {num_heads}.")
        check_pad_mode(pad_mode)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ws = ws
        self.backend = check_backend_choice(backend, f"{type(self).__name__}(backend=...)")
        self.pad_mode = pad_mode

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None, pad_mode: str = "zero") -> "FusedLSA":
        """A FusedLSA sharing ``module``'s submodules (and so its parameters) with it."""
        return _sharing(cls, module, ("dim", "num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop", "ws"),
                        backend=backend, pad_mode=check_pad_mode(pad_mode))

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        check_tokens(x, size, channels=self.dim)  # naming x, not the qkv Linear's output (nor failing inside
        qkv = self.qkv(x)                         # the reference that attention dropout runs)
        # a Linear without bias maps a padded (zero) token to zero
        bias = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(qkv.shape[-1])
        if self.training and self.attention_dropout > 0:
            out = lsa_reference(qkv, bias, size, self.num_heads, self.ws, self.scale, self.pad_mode,
                                dropout_p=self.attention_dropout)
        else:
            out = lsa(qkv, bias, size, self.num_heads, self.ws, self.scale, self.pad_mode, backend=self.backend)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, ws={self.ws}, pad_mode={self.pad_mode}, "
                f"backend={self.backend or 'ambient'}")
