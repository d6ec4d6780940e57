"""mmsegmentation's Twins modules (``mmseg.models.backbones.twins``, 0.x and 1.x) on the fused ops.

``patch_model`` replaces them once that module is imported (an mmsegmentation model has imported it;
twins_kernels never imports mmsegmentation), as it replaces timm's:

- ``LocallyGroupedSelfAttention`` (0.x: ``LocallygroupedSelfAttention``) by a ``FusedLSA`` in
  ``pad_mode="mmseg"``, which keeps its outputs on every map: its mask excludes the padded keys where
  the map is padded on both sides, and nothing where on one side only;
- ``GlobalSubsampledAttention`` by a ``FusedMmsegGSA``: q, k and v are projected by the row blocks of
  its ``nn.MultiheadAttention``'s one packed ``in_proj_weight``, and the residual is added inside, as
  mmsegmentation's forward does;
- ``ConditionalPositionEncoding`` by a ``FusedMmsegCPE``: its conv is ``proj`` itself, not a Sequential.

Each shares the very submodules of the module it replaces, so state_dict keys and values stay
mmsegmentation's: its checkpoints load into a patched model, and a patched model's into mmsegmentation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FusedLSA, _PositionalEncoding, _sharing, _SubsampledAttention
from .ops.common import check_tokens
from .patch import PatchSkip

MODULE = "mmseg.models.backbones.twins"


def unsupported_gsa(module: nn.Module) -> str | None:
    """Why a ``GlobalSubsampledAttention`` computes something the fused one does not (None: it does not)."""
    attn = module.attn
    if not module.batch_first:
        return "batch_first=False"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "its nn.MultiheadAttention has kdim/vdim, add_bias_kv or add_zero_attn"
    if module.sr_ratio > 1:
        if not isinstance(module.norm, nn.LayerNorm) or module.norm.weight is None or module.norm.bias is None:
            return f"norm is {type(module.norm).__name__}, not a LayerNorm with weight and bias"
        if module.sr.bias is None:
            return "its sr conv has no bias"
    return None


class FusedMmsegGSA(_SubsampledAttention):
    """mmsegmentation's ``GlobalSubsampledAttention``, made by ``from_module`` from one (its constructor
    builds mmcv's layers): the same submodules (``attn``, an nn.MultiheadAttention with q, k and v packed in
    ``in_proj_weight`` and ``out_proj``; ``proj_drop``; ``dropout_layer``; ``sr`` and ``norm`` where
    ``sr_ratio`` > 1) and ``forward(x, hw_shape, identity=None)``, which returns ``identity +
    dropout_layer(proj_drop(attention))`` (identity None: x). ``attn`` holds the parameters but is not
    called, so hooks on it do not run. In training with attention dropout (``attn.dropout`` > 0) the
    attention runs the PyTorch reference, as FusedGSA's does."""

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "FusedMmsegGSA":
        """A FusedMmsegGSA sharing ``module``'s submodules (and so its parameters) with it."""
        reason = unsupported_gsa(module)
        if reason is not None:
            raise ValueError(f"FusedMmsegGSA cannot compute this GlobalSubsampledAttention: {reason}")
        return _sharing(cls, module, ("embed_dims", "num_heads", "attn", "proj_drop", "dropout_layer", "sr_ratio"),
                        backend=backend, sr=getattr(module, "sr", None), norm=getattr(module, "norm", None),
                        scale=(module.embed_dims // module.num_heads) ** -0.5)

    @property
    def attention_dropout(self) -> float:
        return self.attn.dropout

    def forward(self, x: torch.Tensor, hw_shape, identity=None) -> torch.Tensor:
        check_tokens(x, hw_shape, channels=self.embed_dims)
        weight, bias = self.attn.in_proj_weight, self.attn.in_proj_bias

        def projection(rows: slice):
            # a view of the packed parameter: its gradient reaches in_proj_weight's rows
            return lambda tokens: F.linear(tokens, weight[rows], None if bias is None else bias[rows])

        out = self.subsampled_attention(x, hw_shape, projection(slice(None, self.embed_dims)),
                                        projection(slice(self.embed_dims, None)))
        out = self.dropout_layer(self.proj_drop(self.attn.out_proj(out)))
        return (x if identity is None else identity) + out


class FusedMmsegCPE(_PositionalEncoding):
    """mmsegmentation's ``ConditionalPositionEncoding``, made by ``from_module`` from one: its ``proj``
    (a depthwise Conv2d; state_dict keys ``proj.weight``, ``proj.bias``) and ``stride``; ``forward(x,
    hw_shape)`` as 1.x calls it, or ``forward(x, H, W)`` as 0.x does. Stride 1 runs the fused kernels."""

    @classmethod
    def from_module(cls, module: nn.Module, backend: str | None = None) -> "FusedMmsegCPE":
        """A FusedMmsegCPE sharing ``module``'s conv (and so its parameters) with it."""
        return _sharing(cls, module, ("proj", "stride"), backend=backend)

    def forward(self, x: torch.Tensor, *hw_shape) -> torch.Tensor:
        return self.positional_encoding(self.proj, x, hw_shape[0] if len(hw_shape) == 1 else hw_shape)


def convert_lsa(module: nn.Module, backend: str | None) -> FusedLSA:
    if module.window_size == 1:
        raise PatchSkip("window_size=1: windows of one token")
    return _sharing(FusedLSA, module, ("num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop"), backend,
                    dim=module.embed_dims, ws=module.window_size, pad_mode="mmseg")


def convert_gsa(module: nn.Module, backend: str | None) -> FusedMmsegGSA:
    reason = unsupported_gsa(module)
    if reason is not None:
        raise PatchSkip(reason)
    return FusedMmsegGSA.from_module(module, backend)


def convert_cpe(module: nn.Module, backend: str | None) -> FusedMmsegCPE:
    conv = module.proj
    if module.stride != 1:
        raise PatchSkip(f"stride {module.stride}: only stride 1 is fused")
    if conv.in_channels != conv.out_channels:
        raise PatchSkip(f"in_channels {conv.in_channels} != embed_dims {conv.out_channels}: only depthwise is fused")
    return FusedMmsegCPE.from_module(module, backend)


# class name in MODULE -> (kind, converter); both spellings of the LSA class, 0.x's and 1.x's
CONVERTERS = {
    "LocallyGroupedSelfAttention": ("lsa", convert_lsa),
    "LocallygroupedSelfAttention": ("lsa", convert_lsa),
    "GlobalSubsampledAttention": ("gsa", convert_gsa),
    "ConditionalPositionEncoding": ("peg", convert_cpe),
}
