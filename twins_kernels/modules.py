"""Drop-in nn.Modules: same constructors, forward signatures, attributes and state_dict keys as timm's
``PosConv``, ``LocallyGroupedAttn`` and ``GlobalSubSampleAttn``, with the fused ops underneath.

Each takes an extra keyword ``backend`` (None = the ambient choice, see ``twins_kernels.backend``),
and ``from_module(m)`` builds one that shares ``m``'s parameters (no copy), which is what
``patch_model`` uses.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops.peg import peg, peg_reference


class FusedPEG(nn.Module):
    """timm ``PosConv(in_chans, embed_dim, stride)``: depthwise 3x3 conv + bias (+ x at stride 1).

    Stride 1 with ``in_chans == embed_dim`` (every Twins model) runs the fused kernels; other
    configurations run the PyTorch reference on every backend.
    """

    def __init__(self, in_chans: int, embed_dim: int = 768, stride: int = 1, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 3, stride, 1, bias=True, groups=embed_dim, device=device, dtype=dtype),
        )
        self.stride = stride
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "FusedPEG":
        """A FusedPEG sharing ``module``'s ``proj`` = Sequential(Conv2d) (and so its parameters) with it."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.proj = module.proj
        fused.stride = module.proj[0].stride[0]  # the conv's own stride: other PEG classes name it differently
        fused.backend = backend
        return fused

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        conv = self.proj[0]
        if conv.in_channels != conv.out_channels:
            return peg_reference(x, conv.weight, conv.bias, size, self.stride)
        return peg(x, conv.weight, conv.bias, size, self.stride, backend=self.backend)

    def no_weight_decay(self):
        return ['proj.%d.weight' % i for i in range(4)]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, backend={self.backend or 'ambient'}"
