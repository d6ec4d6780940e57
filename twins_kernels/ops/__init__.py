"""Functional ops, registered with torch.library in the ``twins_kernels`` namespace."""
from .common import poisoned_outputs
from .gsa import gsa_attention, gsa_attention_reference, gsa_subsample, gsa_subsample_reference
from .lsa import lsa, lsa_reference
from .peg import peg, peg_reference

__all__ = [
    "gsa_attention",
    "gsa_attention_reference",
    "gsa_subsample",
    "gsa_subsample_reference",
    "lsa",
    "lsa_reference",
    "peg",
    "peg_reference",
    "poisoned_outputs",
]
