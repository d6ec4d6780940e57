"""GSA (timm GlobalSubSampleAttn) at the Twins-SVT-S and Twins-PCPVT-S stage shapes, bf16.

Module level (q, sub-sampling conv + LayerNorm, kv, attention, proj), forward and forward+backward, for
``timm`` (eager, SDPA), ``timm_compile``, ``triton`` and ``cuda`` (FusedGSA), and ``mmseg``
(mmsegmentation's GlobalSubsampledAttention with the same weights, called as its encoder layers call it,
with ``identity=0.``: nn.MultiheadAttention returning its attention weights, so explicit scores and
softmax, not SDPA; the zero residual one elementwise op more). The sr = 1 attention core alone, forward
and forward+backward, against PyTorch's flash SDPA on the same (B, N, C) / (B, M, 2C) tensors. The
key/value sub-sampling alone (stride-sr conv + LayerNorm) at the PCPVT-S stages with sr > 1: the fused
Triton kernel against timm's conv (cuDNN) and LayerNorm, eager and under torch.compile (which fuses the
LayerNorm into one kernel after the conv), the comparison the GSA issue asks for.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models.twins import GlobalSubSampleAttn
from torch.nn.attention import SDPBackend, sdpa_kernel

from twins_kernels import FusedGSA
from twins_kernels.ops import gsa_attention, gsa_subsample

from conftest import (ATTENTION_FWDBWD_FLOPS, ATTENTION_VARIANTS, DEVICE, DTYPES, IMAGE_SIZES, PCPVT_S_STAGES,
                      SVT_S_STAGES, build_variant, compiled, record, requires_gpu, skip_unless_available, stage_map,
                      timed_pass)

SR_RATIOS = (8, 4, 2, 1)
MODELS = {
    "svt_s": [(dim, heads, sr) for (dim, heads), sr in zip(SVT_S_STAGES, SR_RATIOS)],
    "pcpvt_s": PCPVT_S_STAGES,
}
CASES = [
    pytest.param(model, image, stage, pass_, variant,
                 id=f"gsa-{pass_}-{model}-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for model in MODELS for image in IMAGE_SIZES for stage in range(4) for pass_ in ("fwd", "fwdbwd")
    for variant in ATTENTION_VARIANTS
]
CORE_CASES = [
    pytest.param(image, pass_, variant,
                 id=f"gsa-core-sr1-{pass_}-svt_s-{image // 8}x{image // 8}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in (224, 512, 1024) for pass_ in ("fwd", "fwdbwd") for variant in ("sdpa", "triton", "cuda")
]
# the cuda backend's sub-sampling is the PyTorch reference (cuDNN's conv, then the LayerNorm in fp32 in
# separate ops, keeping what the backward needs): timed inside the module cases, not alone
SUBSAMPLE_VARIANTS = ("timm", "timm_compile", "triton")
SUBSAMPLE_CASES = [
    pytest.param(image, stage, pass_, variant,
                 id=f"gsa-subsample-{pass_}-pcpvt_s-stage{stage + 1}-{image}-bs{IMAGE_SIZES[image]}-bf16-{variant}")
    for image in (224, 512) for stage in range(3) for pass_ in ("fwd", "fwdbwd") for variant in SUBSAMPLE_VARIANTS
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
    # forward, C per token: x (read by the q Linear, and by the sub-sampling or at sr = 1 the kv Linear),
    # q (written, read), out (written, read), proj out: 7; per key: kv (2C written, read) and at sr > 1
    # the sub-sampled tokens (written, read): 4 + 2. The backward adds, per token: proj's two GEMMs and
    # bias sum (the output gradient read thrice, out read, its gradient written: 5), the attention's (q,
    # out and the gradient read, dq written: 4), the q Linear's (dq read thrice, x read, grad_x written:
    # 5), the sum of x's two gradients (3), and at sr > 1 the sub-sampling's (x read, grad_x written: 2);
    # per key: the attention's (kv read, dkv written: 4), the kv Linear's (dkv read thrice, its input
    # read, that gradient written: 8), and at sr > 1 the sub-sampling's (that gradient read: 1). Where
    # the keys are one block (M <= 64 here: 224² at every stage), the attention's backward takes
    # delta from the probabilities and leaves out unread: 1 C per token fewer than counted
    subsampled = sr > 1
    per_token, per_key = (7, 4 + 2 * subsampled) if pass_ == "fwd" else (24 + 2 * subsampled, 16 + 3 * subsampled)
    # the q, kv and proj Linears and the sub-sampling conv; the attention
    matmul_flops = 2 * tokens * dim * 2 * dim + 2 * keys * dim * 2 * dim + 2 * keys * dim * dim * sr * sr * (sr > 1)
    attention_flops = 4 * tokens * (keys // batch) * dim
    backward = pass_ != "fwd"
    record(benchmark, timed_pass(module, x, (height, width), pass_), roofline,
           bytes_moved=(tokens * per_token + keys * per_key) * dim * x.element_size(),
           flops=matmul_flops * (3 if backward else 1) + attention_flops * (ATTENTION_FWDBWD_FLOPS if backward else 1),
           op="gsa", pass_=pass_, variant=variant, model=model, image=image, stage=stage + 1, batch=batch,
           dtype="bf16")


def flash_sdpa(q, kv, heads: int):
    """PyTorch's flash attention on GSA's (B, N, C) q and (B, M, 2C) kv, as views (no copies in)."""
    batch, _, dim = q.shape
    head_dim = dim // heads
    qh = q.view(batch, -1, heads, head_dim).transpose(1, 2)
    k, v = kv.view(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(qh, k, v).transpose(1, 2).reshape(batch, -1, dim)


@requires_gpu
@pytest.mark.parametrize("image,pass_,variant", CORE_CASES)
def test_gsa_sr1_attention_core(benchmark, roofline, image, pass_, variant):
    """Twins-SVT-S's last stage (sr = 1, C = 512, 16 heads) at 4x the usual map, where N is large."""
    dim, heads, _ = MODELS["svt_s"][3]
    side = image // 8
    batch = IMAGE_SIZES[image]
    q = torch.randn(batch, side * side, dim, device=DEVICE, dtype=DTYPES["bf16"])
    kv = torch.randn(batch, side * side, 2 * dim, device=DEVICE, dtype=DTYPES["bf16"], requires_grad=pass_ != "fwd")
    if variant == "sdpa":
        def core(q, _size):
            return flash_sdpa(q, kv, heads)
    else:
        skip_unless_available(variant)

        def core(q, _size):
            return gsa_attention(q, kv, heads, backend=variant)
    tokens = batch * side * side
    benchmark.group = f"gsa-core-sr1-{pass_}-svt_s-{side}x{side}-bs{batch}-bf16"
    # forward: q, k, v read, out written; the backward reads q, k, v, out, grad_out and writes dq, dk, dv
    record(benchmark, timed_pass(core, q, (side, side), pass_, leaves=[kv]), roofline,
           bytes_moved=(4 if pass_ == "fwd" else 12) * tokens * dim * q.element_size(),
           flops=4 * tokens * side * side * dim * (1 if pass_ == "fwd" else ATTENTION_FWDBWD_FLOPS), op="gsa-core",
           pass_=pass_, variant=variant, image=image, batch=batch, dtype="bf16")


class TimmSubsample(torch.nn.Module):
    """GlobalSubSampleAttn's key/value sub-sampling, as timm's forward runs it (the same three lines),
    on that module's ``sr`` conv and ``norm``."""

    def __init__(self, attn: GlobalSubSampleAttn):
        super().__init__()
        self.sr, self.norm = attn.sr, attn.norm

    def forward(self, x, size):
        B, N, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, *size)
        x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
        return self.norm(x)


@requires_gpu
@pytest.mark.parametrize("image,stage,pass_,variant", SUBSAMPLE_CASES)
def test_gsa_subsample(benchmark, roofline, image, stage, pass_, variant):
    dim, heads, sr = PCPVT_S_STAGES[stage]
    height, width = stage_map(image, stage)
    batch = IMAGE_SIZES[image]
    dtype = DTYPES["bf16"]
    attn = GlobalSubSampleAttn(dim, heads, sr_ratio=sr).to(DEVICE, dtype)
    if variant == "triton":
        def subsample(x, size):
            return gsa_subsample(x, size, attn.sr.weight, attn.sr.bias, attn.norm.weight, attn.norm.bias, sr,
                                 attn.norm.eps, backend="triton")
    else:
        subsample = TimmSubsample(attn)
        if variant == "timm_compile":
            subsample = compiled(subsample)
    x = torch.randn(batch, height * width, dim, device=DEVICE, dtype=dtype)
    benchmark.group = f"gsa-subsample-{pass_}-pcpvt_s-stage{stage + 1}-{image}-bs{batch}-bf16"
    tokens, keys = batch * height * width, batch * (height // sr) * (width // sr)
    # forward: x and the conv weight read, the keys' tokens written; the backward reads grad_out, x and
    # the weight, writes grad_x and the weight's gradient
    conv_weight = dim * dim * sr * sr
    bytes_moved = ((tokens + keys) * dim + conv_weight if pass_ == "fwd"
                   else (3 * tokens + 2 * keys) * dim + 3 * conv_weight) * x.element_size()
    flops = 2 * keys * dim * dim * sr * sr * (1 if pass_ == "fwd" else 3)  # the conv; input and weight grads
    record(benchmark, timed_pass(subsample, x, (height, width), pass_, leaves=list(attn.parameters())), roofline,
           bytes_moved=bytes_moved, flops=flops, op="gsa-subsample", pass_=pass_, variant=variant, image=image,
           stage=stage + 1, batch=batch, dtype="bf16")
