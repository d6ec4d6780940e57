"""PEG (timm PosConv) forward and forward+backward at the Twins-SVT-S stage shapes, bf16.

Variants: ``timm`` (eager PosConv: transpose + cuDNN depthwise conv + add + transpose back),
``timm_compile`` (the same under torch.compile), ``triton`` and ``cuda`` (FusedPEG on that backend).
A perfect kernel moves: forward, x read once and out written once; forward+backward adds grad_out
read once (one pass can make the input and the weight gradients), x read once more and grad_x
written: 5 tensors in all (the kernels here read grad_out twice, in two backward kernels).
"""
import pytest
import torch
from timm.models.twins import PosConv

from twins_kernels import FusedPEG

from conftest import (DEVICE, DTYPES, IMAGE_SIZES, SVT_S_STAGES, VARIANTS, build_variant, record, requires_gpu,
                      stage_map, timed_pass)

CASES = [
    pytest.param(image, stage, pass_, variant,
                 id=f"peg-{pass_}-svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in (224, 512) for stage in range(4) for pass_ in ("fwd", "fwdbwd") for variant in VARIANTS
]


@requires_gpu
@pytest.mark.parametrize("image,stage,pass_,variant", CASES)
def test_peg(benchmark, roofline, image, stage, pass_, variant):
    chans = SVT_S_STAGES[stage][0]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    module = build_variant(variant, PosConv(chans, chans).to(DEVICE, DTYPES["bf16"]), FusedPEG)
    x = torch.randn(batch, height * width, chans, device=DEVICE, dtype=DTYPES["bf16"])
    tensor_bytes = x.numel() * x.element_size()
    benchmark.group = f"peg-{pass_}-svt_s-stage{stage + 1}-{image}-bs{batch}-bf16"
    passes = 1 if pass_ == "fwd" else 3
    record(benchmark, timed_pass(module, x, (height, width), pass_), roofline,
           bytes_moved=(2 if pass_ == "fwd" else 5) * tensor_bytes, flops=2 * 9 * x.numel() * passes,
           op="peg", pass_=pass_, variant=variant, image=image, stage=stage + 1, batch=batch, dtype="bf16")
