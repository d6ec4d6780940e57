"""patch_model / unpatch_model on real timm Twins models: what is replaced, checkpoints, parity,
torch.compile, wrappers, and the registry for other Twins implementations."""
import copy

import pytest
import timm
import torch
from timm.models import twins
from torch import nn

import twins_kernels
from twins_kernels import FusedPEG, PatchSkip, patch_model, patched, register_patch, unpatch_model
from twins_kernels.patch import KINDS, _register_builtins, _registry

from conftest import HAS_GPU, KERNEL_DEVICE, requires_gpu
from parity import DTYPE_IDS, TOLERANCE, rel_err

VARIANTS = ["twins_pcpvt_small", "twins_pcpvt_base", "twins_pcpvt_large",
            "twins_svt_small", "twins_svt_base", "twins_svt_large"]
TIMM_CLASSES = {"lsa": twins.LocallyGroupedAttn, "gsa": twins.GlobalSubSampleAttn, "peg": twins.PosConv}


def fused_kinds():
    """The kinds the package fuses (all three once every op has landed)."""
    _register_builtins()
    return sorted({registration.kind for registration in _registry.values()} & set(KINDS))


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def small_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_replaces_every_module_and_keeps_the_state_dict(name):
    model = small_model(name)
    expected = {kind: count(model, TIMM_CLASSES[kind]) for kind in fused_kinds()}
    state = copy.deepcopy(model.state_dict())
    report = patch_model(model)
    assert dict(report.replaced) == {k: v for k, v in expected.items() if v}
    for kind in fused_kinds():
        assert count(model, TIMM_CLASSES[kind]) == 0
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(torch.equal(patched_state[k], state[k]) for k in state)
    assert patch_model(model).replaced == {}, "patching twice must change nothing"
    assert unpatch_model(model) == sum(expected.values())
    assert all(count(model, TIMM_CLASSES[kind]) == expected[kind] for kind in expected)


def test_checkpoints_load_both_ways():
    source = small_model("twins_svt_small")
    patched_model = small_model("twins_svt_small")
    patch_model(patched_model)
    patched_model.load_state_dict(source.state_dict())  # timm checkpoint -> patched model
    plain = small_model("twins_svt_small")
    plain.load_state_dict(patched_model.state_dict())  # patched checkpoint -> timm model
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), source.state_dict().values()))


def model_parity(name, backend, dtype, device, image=(96, 128), batch=1):
    """Logits, intermediate features and every parameter gradient: patched vs the float64 timm model."""
    torch.manual_seed(0)
    reference = small_model(name).to(device, torch.float64)
    model = copy.deepcopy(reference).to(device, dtype)
    report = patch_model(model, backend=backend)
    assert sum(report.replaced.values()) > 0
    x = torch.randn(batch, 3, *image, device=device)
    out_ref = reference(x.double())
    with twins_kernels.ops.poisoned_outputs():
        out = model(x.to(dtype))
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    with twins_kernels.ops.poisoned_outputs():
        out.backward(grad.to(dtype))
    tol = TOLERANCE[dtype]
    errors = {"logits": rel_err(out, out_ref)}
    with torch.no_grad():
        feats_ref = reference.forward_intermediates(x.double(), intermediates_only=True)
        feats = model.forward_intermediates(x.to(dtype), intermediates_only=True)
    errors.update({f"stage{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(feats, feats_ref))})
    ref_params = dict(reference.named_parameters())
    for pname, param in model.named_parameters():
        errors[f"grad {pname}"] = rel_err(param.grad, ref_params[pname].grad)
    # a model-level error is a sum of many ops' errors: allow a depth's worth of rounding in fp32
    model_tol = tol * (10 if dtype == torch.float32 else 1)
    failed = {k: v for k, v in errors.items() if not v <= model_tol}
    assert not failed, f"{name} {DTYPE_IDS[dtype]}: errors above {model_tol:.0e}: {failed}"


@pytest.mark.parametrize("name", ["twins_svt_small", "twins_pcpvt_small"])
def test_model_parity_triton_kernels(name):
    model_parity(name, "triton", torch.float32, KERNEL_DEVICE)


@pytest.mark.parametrize("name", VARIANTS)
def test_model_parity_every_variant_reference_backend(name):
    model_parity(name, "torch", torch.float32, "cpu", image=(64, 96))


@requires_gpu
@pytest.mark.parametrize("image", [(224, 224), (512, 512)])
@pytest.mark.parametrize("name", VARIANTS)
def test_model_parity_bf16_on_gpu(name, image):
    model_parity(name, "triton", torch.bfloat16, "cuda", image=image, batch=2)


def test_torch_compile_fullgraph_patched_model():
    model = small_model("twins_svt_small").to(KERNEL_DEVICE)
    patch_model(model, backend=None if HAS_GPU else "torch")
    x = torch.randn(1, 3, 64, 96, device=KERNEL_DEVICE)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
        actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_features_only_backbone_and_wrappers():
    backbone = timm.create_model("twins_svt_small", pretrained=False, features_only=True).eval()
    wrapper = nn.Sequential(nn.Identity(), backbone)
    x = torch.randn(1, 3, 64, 96)
    expected = [f.clone() for f in wrapper(x)]
    report = patch_model(wrapper, backend="torch")
    assert report.replaced["peg"] == 4
    for a, b in zip(wrapper(x), expected):
        torch.testing.assert_close(a, b)


def test_before_or_after_to_dtype():
    model = small_model("twins_svt_small")
    patch_model(model, backend="torch")
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    unpatch_model(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_context_manager_and_ops_selection():
    model = small_model("twins_svt_small")
    with patched(model, ops=("peg",)) as report:
        assert set(report.replaced) == {"peg"}
        assert count(model, twins.PosConv) == 0
    assert count(model, twins.PosConv) == 4
    with pytest.raises(ValueError, match="conv"):
        patch_model(model, ops=("conv",))


def test_modules_left_alone_are_reported():
    model = nn.Sequential(twins.PosConv(32, 32, stride=2), twins.PosConv(32, 32))
    report = patch_model(model)
    assert report.replaced["peg"] == 1
    assert report.skipped == [("0", "stride 2: only stride 1 is fused (timm's own path is as fast)")]
    assert "left alone: 0: stride 2" in str(report)


# --- the extension point, with a faithful stand-in of the original Twins repository's PosCNN ---
class PosCNN(nn.Module):
    """As in the original Twins repository (Meituan-AutoML/Twins): forward(x, H, W), stride named s."""

    def __init__(self, in_chans, embed_dim=768, s=1):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 3, s, 1, bias=True, groups=embed_dim))
        self.s = s

    def forward(self, x, H, W):
        B, N, C = x.shape
        cnn_feat = x.transpose(1, 2).view(B, C, H, W)
        if self.s == 1:
            x = self.proj(cnn_feat) + cnn_feat
        else:
            x = self.proj(cnn_feat)
        return x.flatten(2).transpose(1, 2)


class FusedPosCNN(FusedPEG):
    """FusedPEG with PosCNN's forward signature."""

    def forward(self, x, H, W):
        return super().forward(x, (H, W))


def convert_poscnn(module, backend):
    if module.s != 1:
        raise PatchSkip(f"s={module.s}")
    return FusedPosCNN.from_module(module, backend=backend)


def test_register_patch_for_another_implementation():
    register_patch(PosCNN, "peg", convert_poscnn)
    try:
        model = nn.ModuleList([PosCNN(24, 24), PosCNN(24, 24, s=2)])
        x = torch.randn(2, 35, 24)
        expected = model[0](x, 5, 7)
        report = patch_model(model, backend="triton")
        assert report.replaced["peg"] == 1 and report.skipped == [("1", "s=2")]
        assert isinstance(model[0], FusedPosCNN)
        torch.testing.assert_close(model[0](x, 5, 7), expected)
        unpatch_model(model)
        assert type(model[0]) is PosCNN
    finally:
        del _registry[PosCNN]


def test_register_patch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        register_patch(PosCNN, "attention", convert_poscnn)
    with pytest.raises(TypeError, match="nn.Module"):
        register_patch(int, "peg", convert_poscnn)


@requires_gpu
def test_cuda_graph_capture_with_reduce_overhead():
    model = small_model("twins_svt_small").cuda().to(torch.bfloat16)
    patch_model(model)
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up runs, then replays of the captured graph
            actual = compiled(x)
    assert rel_err(actual, expected) <= TOLERANCE[torch.bfloat16]


@requires_gpu
@pytest.mark.parametrize("name", ["twins_svt_small", "twins_pcpvt_small"])
def test_training_steps_track_the_unpatched_model(name):
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=10).cuda()
    fused = copy.deepcopy(plain)
    patch_model(fused)
    losses = {"plain": [], "fused": []}
    x = torch.randn(8, 3, 224, 224, device="cuda")
    target = torch.randint(0, 10, (8,), device="cuda")
    for key, model in (("plain", plain), ("fused", fused)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(5):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses[key].append(loss.item())
    for a, b in zip(losses["plain"], losses["fused"]):
        assert abs(a - b) <= 2e-2 * max(1.0, abs(a)), losses
