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
from .modules import FusedPEG
from .ops import peg
from .patch import PatchReport, PatchSkip, patch_model, patched, register_patch, unpatch_model

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedPEG",
    "PatchReport",
    "PatchSkip",
    "available_backends",
    "cuda_extension_built",
    "get_backend",
    "patch_model",
    "patched",
    "peg",
    "register_patch",
    "set_backend",
    "unpatch_model",
    "use_backend",
]
