"""LSA (timm LocallyGroupedAttn) at the Twins-SVT-S stage shapes, bf16, ws = 7.

Module level (qkv Linear + attention + proj), forward and forward+backward, for ``timm`` (eager: pad,
window reshapes, 5-D SDPA that falls back to the math path), ``timm_compile``, ``triton`` and ``cuda``
(FusedLSA), and ``mmseg`` (mmsegmentation's LocallyGroupedSelfAttention with the same weights: the same
reshapes, an explicit mask added to the scores and softmax; where the map is padded on both sides (at
512² and 1024², every stage), it masks the padded keys, which FusedLSA's ``pad_mode="mmseg"`` reproduces
and the cases' FusedLSA, timm's zero padding, does not). Attention core alone for the kernel backends,
forward and forward+backward, with the bytes a perfect kernel moves: forward, qkv read once (3C per
token) and out written once (C); the backward reads qkv and grad_out and writes grad_qkv (7C), after its
own forward (delta comes from the probabilities, so out is not read).
"""
import pytest
import torch
from timm.models.twins import LocallyGroupedAttn

from twins_kernels import FusedLSA
from twins_kernels.ops import lsa

from conftest import (ATTENTION_FWDBWD_FLOPS, ATTENTION_VARIANTS, DEVICE, DTYPES, IMAGE_SIZES, SVT_S_STAGES,
                      build_variant, record, requires_gpu, skip_unless_available, stage_map, timed_pass)

WS = 7
CASES = [
    pytest.param(image, stage, pass_, variant,
                 id=f"lsa-{pass_}-svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in IMAGE_SIZES for stage in range(4) for pass_ in ("fwd", "fwdbwd") for variant in ATTENTION_VARIANTS
]
CORE_CASES = [
    pytest.param(image, stage, pass_, backend,
                 id=f"lsa-core-{pass_}-svt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{backend}")
    for image in IMAGE_SIZES for stage in range(4) for pass_ in ("fwd", "fwdbwd") for backend in ("triton", "cuda")
]


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
    # forward, C per token: x, qkv (3C, written and read), attention out (written and read), proj out: 10;
    # the backward adds proj's two GEMMs and bias sum (the output gradient read thrice, out read, its
    # gradient written: 5), the attention's (qkv and the gradient read, grad_qkv written: 7) and the qkv
    # Linear's (grad_qkv read thrice, x read, grad_x written: 11): 33
    per_token = 10 if pass_ == "fwd" else 33
    matmul_flops = 2 * tokens * dim * 4 * dim  # the qkv and proj Linears
    # each token's query against its window's ws^2 keys (padded slots are keys too; their queries are cropped)
    attention_flops = 4 * tokens * WS * WS * dim
    backward = pass_ != "fwd"
    record(benchmark, timed_pass(module, x, (height, width), pass_), roofline,
           bytes_moved=per_token * tokens * dim * x.element_size(),
           flops=matmul_flops * (3 if backward else 1) + attention_flops * (ATTENTION_FWDBWD_FLOPS if backward else 1),
           op="lsa", pass_=pass_, variant=variant, image=image, stage=stage + 1, batch=batch, dtype="bf16")


@requires_gpu
@pytest.mark.parametrize("image,stage,pass_,backend", CORE_CASES)
def test_lsa_attention_core(benchmark, roofline, image, stage, pass_, backend):
    skip_unless_available(backend)
    dim, heads = SVT_S_STAGES[stage]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    qkv = torch.randn(batch, height * width, 3 * dim, device=DEVICE, dtype=DTYPES["bf16"])
    bias = torch.randn(3 * dim, device=DEVICE, dtype=DTYPES["bf16"], requires_grad=True)
    benchmark.group = f"lsa-core-{pass_}-svt_s-stage{stage + 1}-{image}-bs{batch}-bf16"

    def core(qkv, size):
        return lsa(qkv, bias, size, heads, WS, backend=backend)
    tokens_c = batch * height * width * dim
    flops_fwd = 4 * batch * height * width * WS * WS * dim  # as the module's attention_flops
    record(benchmark, timed_pass(core, qkv, (height, width), pass_, leaves=[bias]), roofline,
           bytes_moved=(4 if pass_ == "fwd" else 11) * tokens_c * qkv.element_size(),
           flops=flops_fwd * (1 if pass_ == "fwd" else ATTENTION_FWDBWD_FLOPS), op="lsa-core", pass_=pass_,
           variant=backend, image=image, stage=stage + 1, batch=batch, dtype="bf16")
