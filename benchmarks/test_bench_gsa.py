"""GSA (timm GlobalSubSampleAttn) at the Twins-SVT-S and Twins-PCPVT-S stage shapes, bf16.

Module level (q, sub-sampling conv + LayerNorm, kv, attention, proj), forward and forward+backward,
for ``timm`` (eager, SDPA), ``timm_compile``, ``triton`` and ``cuda`` (FusedGSA). The sr = 1
attention core alone against PyTorch's SDPA (flash) on the same (B, N, C) / (B, M, 2C) tensors.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models.twins import GlobalSubSampleAttn

from twins_kernels import FusedGSA
from twins_kernels.ops import gsa_attention

from conftest import (DEVICE, DTYPES, IMAGE_SIZES, PCPVT_S_STAGES, SVT_S_STAGES, VARIANTS, build_variant,
                      record, requires_gpu, skip_unless_available, stage_map, timed_pass)

SR_RATIOS = (8, 4, 2, 1)
MODELS = {
    "svt_s": [(dim, heads, sr) for (dim, heads), sr in zip(SVT_S_STAGES, SR_RATIOS)],
    "pcpvt_s": PCPVT_S_STAGES,
}
CASES = [
    pytest.param(model, image, stage, pass_, variant,
                 id=f"gsa-{pass_}-{model}-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for model in MODELS for image in IMAGE_SIZES for stage in range(4) for pass_ in ("fwd", "fwdbwd")
    for variant in VARIANTS
]
CORE_CASES = [
    pytest.param(image, variant, id=f"gsa-core-sr1-fwd-svt_s-{image // 8}x{image // 8}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in (224, 512) for variant in ("sdpa", "triton", "cuda")
]


@requires_gpu
@pytest.mark.parametrize("model,image,stage,pass_,variant", CASES)
def test_gsa_module(benchmark, roofline, model, image, stage, pass_, variant):
    dim, heads, sr = MODELS[model][stage]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    dtype = DTYPES["bf16"]
    timm_module = GlobalSubSampleAttn(dim, heads, sr_ratio=sr).to(DEVICE, dtype).eval()
    module = build_variant(variant, timm_module, FusedGSA)
    x = torch.randn(batch, height * width, dim, device=DEVICE, dtype=dtype)
    benchmark.group = f"gsa-{pass_}-{model}-stage{stage + 1}-{image}-bs{batch}-bf16"
    tokens = batch * height * width
    keys = batch * (height // sr) * (width // sr)
    # x (read twice when sr > 1), q (written, read), kv (2C written, read), out (written, read), proj out
    bytes_fwd = (tokens * (1 + (sr > 1) + 2 + 2 + 1) + keys * 4) * dim * x.element_size()
    flops_fwd = 2 * tokens * dim * 2 * dim + 2 * keys * dim * 2 * dim + 4 * tokens * (keys // batch) * dim
    passes = 1 if pass_ == "fwd" else 3
    record(benchmark, timed_pass(module, x, (height, width), pass_), roofline,
           bytes_moved=bytes_fwd * passes, flops=flops_fwd * passes, op="gsa", pass_=pass_, variant=variant,
           model=model, image=image, stage=stage + 1, batch=batch, dtype="bf16")


@requires_gpu
@pytest.mark.parametrize("image,variant", CORE_CASES)
def test_gsa_sr1_attention_core(benchmark, roofline, image, variant):
    """Twins-SVT-S's last stage (sr = 1, C = 512, 16 heads) at 4x the usual map, where N is large."""
    dim, heads, _ = MODELS["svt_s"][3]
    side = image // 8
    batch = IMAGE_SIZES[image]
    q = torch.randn(batch, side * side, dim, device=DEVICE, dtype=DTYPES["bf16"])
    kv = torch.randn(batch, side * side, 2 * dim, device=DEVICE, dtype=DTYPES["bf16"])
    if variant == "sdpa":
        head_dim = dim // heads

        def run():
            qh = q.view(batch, -1, heads, head_dim).transpose(1, 2)
            k, v = kv.view(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(batch, -1, dim)
    else:
        skip_unless_available(variant)

        def run():
            gsa_attention(q, kv, heads, backend=variant)
    tokens = batch * side * side
    benchmark.group = f"gsa-core-sr1-fwd-svt_s-{side}x{side}-bs{batch}-bf16"
    record(benchmark, run, roofline, bytes_moved=4 * tokens * dim * q.element_size(),  # q, k, v read, out written
           flops=4 * tokens * side * side * dim, op="gsa-core", pass_="fwd", variant=variant, image=image,
           batch=batch, dtype="bf16")
