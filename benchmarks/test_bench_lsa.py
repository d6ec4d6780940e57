"""LSA (timm LocallyGroupedAttn) at the Twins-SVT-S stage shapes, bf16, ws = 7.

Module level (qkv Linear + attention + proj), forward and forward+backward, for ``timm`` (eager: pad,
window reshapes, 5-D SDPA that falls back to the math path), ``timm_compile``, ``triton`` and
``cuda`` (FusedLSA). Attention core alone for the kernel backends, with the bytes a perfect kernel
moves: qkv read once (3C per token) and out written once (C per token).
"""
import pytest
import torch
from timm.models.twins import LocallyGroupedAttn

from twins_kernels import FusedLSA
from twins_kernels.ops import lsa

from conftest import (DEVICE, DTYPES, IMAGE_SIZES, SVT_S_STAGES, VARIANTS, build_variant, record,
                      requires_gpu, skip_unless_available, stage_map, timed_pass)

WS = 7
CASES = [
    pytest.param(image, stage, pass_, variant,
                 id=f"lsa-{pass_}-svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in IMAGE_SIZES for stage in range(4) for pass_ in ("fwd", "fwdbwd") for variant in VARIANTS
]
CORE_CASES = [
    pytest.param(image, stage, backend,
                 id=f"lsa-core-fwd-svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{backend}")
    for image in IMAGE_SIZES for stage in range(4) for backend in ("triton", "cuda")
]


def padded_tokens(height: int, width: int) -> int:
    return -(-height // WS) * WS * (-(-width // WS) * WS)


@requires_gpu
@pytest.mark.parametrize("image,stage,pass_,variant", CASES)
def test_lsa_module(benchmark, roofline, image, stage, pass_, variant):
    dim, heads = SVT_S_STAGES[stage]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    dtype = DTYPES["bf16"]
    module = build_variant(variant, LocallyGroupedAttn(dim, heads, ws=WS).to(DEVICE, dtype).eval(), FusedLSA)
    x = torch.randn(batch, height * width, dim, device=DEVICE, dtype=dtype)
    benchmark.group = f"lsa-{pass_}-svt_s-stage{stage + 1}-{image}-bs{batch}-bf16"
    tokens = batch * height * width
    # x, qkv (3C, written and read), attention out (written and read), proj out: 1 + 6 + 2 + 1 = 10 C/token
    bytes_fwd = 10 * tokens * dim * x.element_size()
    flops_fwd = 2 * tokens * dim * 4 * dim + 4 * batch * padded_tokens(height, width) * WS * WS * dim
    passes = 1 if pass_ == "fwd" else 3
    record(benchmark, timed_pass(module, x, (height, width), pass_), roofline,
           bytes_moved=bytes_fwd * passes, flops=flops_fwd * passes, op="lsa", pass_=pass_, variant=variant,
           image=image, stage=stage + 1, batch=batch, dtype="bf16")


@requires_gpu
@pytest.mark.parametrize("image,stage,backend", CORE_CASES)
def test_lsa_attention_core(benchmark, roofline, image, stage, backend):
    skip_unless_available(backend)
    dim, heads = SVT_S_STAGES[stage]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    qkv = torch.randn(batch, height * width, 3 * dim, device=DEVICE, dtype=DTYPES["bf16"])
    bias = torch.randn(3 * dim, device=DEVICE, dtype=DTYPES["bf16"])
    benchmark.group = f"lsa-core-fwd-svt_s-stage{stage + 1}-{image}-bs{batch}-bf16"

    def run():
        lsa(qkv, bias, (height, width), heads, WS, backend=backend)
    record(benchmark, run, roofline, bytes_moved=4 * batch * height * width * dim * qkv.element_size(),
           flops=4 * batch * padded_tokens(height, width) * WS * WS * dim, op="lsa-core", pass_="fwd",
           variant=backend, image=image, stage=stage + 1, batch=batch, dtype="bf16")
