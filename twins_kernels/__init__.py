"""Fused GPU kernels for the Twins vision transformers (Twins-PCPVT, Twins-SVT).

    from twins_kernels import FusedPEG, set_backend, use_backend
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

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedPEG",
    "available_backends",
    "cuda_extension_built",
    "get_backend",
    "peg",
    "set_backend",
    "use_backend",
]
