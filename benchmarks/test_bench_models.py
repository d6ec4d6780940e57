"""Whole-model throughput of the six timm Twins variants, bf16: timm eager, timm + torch.compile,
patched eager, patched + torch.compile.

Inference at 224 (batch 256), the backbone (``forward_features``) at 512 (batch 16) and 1024
(batch 4), and a training step (forward, backward, SGD update) at 224 (batch 64) with peak memory.
``extra_info`` carries images/s, and the FLOPs of a call (``model_flops``), so TFLOP/s and the % of
the bf16 matmul rate: no byte count (a model's traffic depends on what its kernels keep on chip).
"""

import pytest
import timm
import torch

from twins_kernels import patch_model

from conftest import DEVICE, compiled, flop_counter, record, requires_gpu

MODELS = ["twins_pcpvt_small", "twins_pcpvt_base", "twins_pcpvt_large",
          "twins_svt_small", "twins_svt_base", "twins_svt_large"]
VARIANTS = ["timm", "timm_compile", "patched", "patched_compile"]
MODES = [("infer", 224, 256), ("backbone", 512, 16), ("backbone", 1024, 4), ("train", 224, 64)]  # (mode, size, batch)
CASES = [
    pytest.param(name, mode, image, batch, variant, id=f"model-{name}-{mode}-{image}-bs{batch}-bf16-{variant}")
    for name in MODELS for mode, image, batch in MODES for variant in VARIANTS
]


def build(name: str, variant: str):
    model = timm.create_model(name, pretrained=False).to(DEVICE, torch.bfloat16)
    if variant.startswith("patched"):
        patch_model(model)
    return model


_FLOPS: dict[tuple, float] = {}


def model_flops(name: str, mode: str, image: int, batch: int) -> float:
    """The FLOPs of one call of a case (a training step: forward and backward), counted once per case by
    PyTorch's FLOP counter (its depthwise conv backward counted right) on timm's eager model: the patched
    model does the same math inside custom ops, which the counter does not see into."""
    key = (name, mode, image, batch)
    if key not in _FLOPS:
        model = build(name, "timm").train(mode == "train")
        x = torch.randn(batch, 3, image, image, device=DEVICE, dtype=torch.bfloat16)
        with flop_counter() as counter:
            if mode == "train":
                model(x).float().logsumexp(-1).sum().backward()
            else:
                with torch.no_grad():
                    (model.forward_features if mode == "backbone" else model)(x)
        _FLOPS[key] = float(counter.get_total_flops())
    return _FLOPS[key]


@requires_gpu
@pytest.mark.parametrize("name,mode,image,batch,variant", CASES)
def test_model(benchmark, roofline, name, mode, image, batch, variant):
    model = build(name, variant)
    x = torch.randn(batch, 3, image, image, device=DEVICE, dtype=torch.bfloat16)
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        target = torch.randint(0, model.num_classes, (batch,), device=DEVICE)
        step_model = compiled(model) if variant.endswith("compile") else model

        def run():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(step_model(x), target).backward()
            optimizer.step()
    else:
        model.eval()
        forward = model.forward_features if mode == "backbone" else model.forward
        forward = compiled(forward) if variant.endswith("compile") else forward

        def run():
            with torch.no_grad():
                forward(x)
    benchmark.group = f"model-{name}-{mode}-{image}-bs{batch}-bf16"
    ms = record(benchmark, run, roofline, bytes_moved=0.0, flops=model_flops(name, mode, image, batch), op="model",
                pass_=mode, variant=variant, model=name, image=image, batch=batch, dtype="bf16")
    benchmark.extra_info["images_per_s"] = batch / (ms * 1e-3)
