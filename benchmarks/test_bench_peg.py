"""PEG (timm PosConv) forward and forward+backward at the Twins-SVT-S stage shapes, bf16.

Variants: ``timm`` (eager PosConv: transpose + cuDNN depthwise conv + add + transpose back),
``timm_compile`` (the same under torch.compile), ``triton`` and ``cuda`` (FusedPEG on that backend).
A perfect kernel moves: forward, x read once and out written once; forward+backward adds grad_out
read twice (input and weight gradients), x read once more and grad_x written: 6 tensors in all.
"""
import copy

import pytest
import torch
from timm.models.twins import PosConv

from twins_kernels import FusedPEG
from twins_kernels.backend import backend_status

from conftest import DTYPES, IMAGE_SIZES, SVT_S_STAGES, record, requires_gpu, stage_map

VARIANTS = ["timm", "timm_compile", "triton", "cuda"]
CASES = [
    pytest.param(image, stage, id=f"svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}")
    for image in (224, 512) for stage in range(4)
]


def build(variant: str, chans: int, dtype):
    module = PosConv(chans, chans).to("cuda", dtype)
    if variant == "timm":
        return module
    if variant == "timm_compile":
        return torch.compile(copy.deepcopy(module))
    status = backend_status(variant, "cuda")
    if not status.available:
        pytest.skip(status.reason)
    return FusedPEG.from_module(module, backend=variant)


@requires_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("image,stage", CASES)
def test_peg(benchmark, roofline, image, stage, pass_, variant):
    dtype = DTYPES["bf16"]
    chans = SVT_S_STAGES[stage][0]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    module = build(variant, chans, dtype)
    x = torch.randn(batch, height * width, chans, device="cuda", dtype=dtype, requires_grad=pass_ == "fwdbwd")
    tensor_bytes = x.numel() * x.element_size()
    benchmark.group = f"peg-{pass_}-svt_s-stage{stage + 1}-{image}-bs{batch}-bf16"
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                module(x, (height, width))
        bytes_moved = 2 * tensor_bytes
    else:
        grad = torch.randn(batch, height * width, chans, device="cuda", dtype=dtype)

        def run():
            module(x, (height, width)).backward(grad)
        bytes_moved = 6 * tensor_bytes
    record(benchmark, run, roofline, bytes_moved=bytes_moved, flops=2 * 9 * x.numel() * (3 if pass_ == "fwdbwd" else 1),
           op="peg", pass_=pass_, variant=variant, image=image, stage=stage + 1, batch=batch, dtype="bf16")
