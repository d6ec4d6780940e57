"""Fused GPU kernels for the Twins vision transformers (Twins-PCPVT, Twins-SVT).

    from twins_kernels import FusedPEG, patch_model, set_backend, use_backend
"""
from .backend import (
    BackendUnavailableError,
    available_backends,
    cuda_extension_built,
    get_backend,
    set_backend,
    use_backend,
)
from .modules import FusedGSA, FusedLSA, FusedPEG
from .ops import gsa_attention, gsa_subsample, lsa, peg
from .patch import PatchReport, PatchSkip, patch_model, patched, register_patch, unpatch_model

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedGSA",
    "FusedLSA",
    "FusedPEG",
    "PatchReport",
    "PatchSkip",
    "available_backends",
    "cuda_extension_built",
    "get_backend",
    "gsa_attention",
    "gsa_subsample",
    "lsa",
    "patch_model",
    "patched",
    "peg",
    "register_patch",
    "set_backend",
    "unpatch_model",
    "use_backend",
]
