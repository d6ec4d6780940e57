"""patch_model / unpatch_model on real timm Twins models: what is replaced, checkpoints, parity,
torch.compile, wrappers, and the registry for other Twins implementations."""
import copy
import io
import threading

import pytest
import timm
import torch
from timm.models import twins
from torch import nn
from torch._dynamo.utils import counters

import twins_kernels
from twins_kernels import FusedLSA, FusedPEG, patch_model, patched, register_patch, unpatch_model
import twins_kernels.patch
from twins_kernels.patch import KINDS, _registry

from conftest import HAS_GPU, KERNEL_DEVICE, SHALLOW, readme_python_block, requires_gpu
from parity import DTYPE_IDS, TOLERANCE, rel_err
from twins_kernels.testing import model_error_allowed

VARIANTS = ["twins_pcpvt_small", "twins_pcpvt_base", "twins_pcpvt_large",
            "twins_svt_small", "twins_svt_base", "twins_svt_large"]
TIMM_CLASSES = {"lsa": twins.LocallyGroupedAttn, "gsa": twins.GlobalSubSampleAttn, "peg": twins.PosConv}


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def small_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_replaces_every_module_and_keeps_the_state_dict(name):
    model = small_model(name)
    expected = {kind: count(model, TIMM_CLASSES[kind]) for kind in KINDS}
    state = copy.deepcopy(model.state_dict())
    report = patch_model(model)
    assert dict(report.replaced) == {k: v for k, v in expected.items() if v}
    for kind in KINDS:
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


def run_model(model, x, grad, autocast=None):
    """Logits, forward_intermediates features and parameter gradients of one forward and backward, the
    forward under ``torch.autocast`` to ``autocast`` when given."""
    x = x.to(next(model.parameters()).dtype)
    mixed_precision = torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None)
    with twins_kernels.ops.poisoned_outputs():
        with mixed_precision:
            out = model(x)
        out.backward(grad.to(out.dtype))
        with torch.no_grad(), mixed_precision:
            feats = model.forward_intermediates(x, intermediates_only=True)
    results = {"logits": out}
    results.update({f"stage{i}": feat for i, feat in enumerate(feats)})
    results.update({f"grad {name}": param.grad for name, param in model.named_parameters()})
    return results


def model_parity(name, backend, dtype, device, image=(64, 96), batch=1, autocast=None, **model_kwargs):
    """Logits, intermediate features and every parameter gradient of the patched model in ``dtype``
    against the timm model in float64 with the same (rounded) parameters, input and output gradient.
    With ``autocast`` (a 16-bit dtype), the patched and the timm model keep ``dtype`` parameters and run
    their forward under ``torch.autocast``, as mixed-precision training does.

    Each quantity may be ``model_error_allowed`` off: ten op tolerances in fp32; in fp16/bf16 the op
    tolerance or twice the unpatched timm model's own error in that dtype (timm in bf16 is itself
    about 1e-2 off on the logits and up to 7e-2 on LayerNorm weight gradients).

    The default image, 64x96, makes maps that are no multiple of 7: Twins-SVT's first map (16x24) is
    padded to LSA's 7x7 windows, and the last stage's GSA / PCPVT's sr=8 stage see a handful of keys."""
    torch.manual_seed(0)
    plain = small_model(name, **model_kwargs).to(device, dtype)
    reference = copy.deepcopy(plain).to(torch.float64)
    model = copy.deepcopy(plain)
    report = patch_model(model, backend=backend)
    assert sum(report.replaced.values()) > 0
    x = torch.randn(batch, 3, *image, device=device).to(dtype)
    grad = torch.randn(batch, reference.num_classes, device=device).to(dtype)
    expected = run_model(reference, x, grad)
    errors = {key: rel_err(value, expected[key]) for key, value in run_model(model, x, grad, autocast).items()}
    plain_errors = {key: rel_err(value, expected[key]) for key, value in run_model(plain, x, grad, autocast).items()}
    allowed = {key: model_error_allowed(autocast or dtype, plain_errors[key]) for key in errors}
    failed = {key: f"{err:.2e} > {allowed[key]:.2e}" for key, err in errors.items() if not err <= allowed[key]}
    assert not failed, f"{name} {DTYPE_IDS[dtype]}: {failed}"


# The variants whose blocks differ, each once: the PCPVTs share their widths and heads (64-512, head_dim
# 64) and differ in depth only, so PCPVT-S runs every block PCPVT-B and -L have; SVT-B (widths 96-768,
# 3-24 heads: C no power of two) and SVT-S (64-512) at head_dim 32 cover SVT-L's (128-1024, SVT-S's doubled)
# in kind. Every variant runs whole on the reference backend below and on a GPU.
KERNEL_PARITY_VARIANTS = ["twins_pcpvt_small", "twins_svt_small", "twins_svt_base"]


@pytest.mark.parametrize("name", KERNEL_PARITY_VARIANTS)
def test_model_parity_triton_kernels(name):
    """The kernels of every kind of Twins block, in the interpreter on a CPU: each variant with two blocks
    a stage (its own widths and head counts, every op in every stage; a stage's further blocks repeat
    these at the same shapes, at 2-3x the interpreter time)."""
    model_parity(name, "triton", torch.float32, KERNEL_DEVICE, depths=SHALLOW)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_model_parity_16bit_triton_kernels(dtype):
    """Twins-SVT-S with two blocks a stage (all three ops in every stage) in fp16 and bf16."""
    model_parity("twins_svt_small", "triton", dtype, KERNEL_DEVICE, depths=SHALLOW)


@pytest.mark.parametrize("name,autocast", [("twins_svt_small", torch.bfloat16), ("twins_pcpvt_small", torch.float16)],
                         ids=["svt_s-bf16", "pcpvt_s-fp16"])
def test_model_parity_under_autocast(name, autocast):
    """Mixed-precision training's forward: fp32 parameters, 16-bit activations. The fused ops get 16-bit
    q/k/v next to the fp32 qkv bias, and fp32 tokens (LayerNorm's and the residual stream's output under
    autocast) into PEG and the sub-sampling, where timm's convs run in 16 bits."""
    model_parity(name, "triton", torch.float32, KERNEL_DEVICE, autocast=autocast, depths=SHALLOW)


@pytest.mark.parametrize("name", VARIANTS)
def test_model_parity_every_variant_reference_backend(name):
    model_parity(name, "torch", torch.float32, "cpu")


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


def test_torch_compile_dynamic_image_sizes_patched_model():
    """A model fed images of several sizes (as segmentation does), compiled with dynamic=True: every size,
    the maps padded for LSA's windows or not, runs on the one graph compiled for the first, with eager's
    output. (timm's own model compiles a graph for each of these sizes: 4, in 224 s on a 2-core CPU.)"""
    model = small_model("twins_svt_small", depths=SHALLOW)
    patch_model(model, backend="torch")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    sizes = [(64, 96), (112, 224), (96, 160), (224, 224)]
    with torch.no_grad():
        for height, width in sizes:
            x = torch.randn(2, 3, height, width)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"{graphs} graphs compiled for image sizes {sizes}: a new size recompiled"


def test_export_copy_and_save_a_patched_model(tmp_path):
    """What deployment does with a model: torch.export with the image size as a symbol (the ops stay
    twins_kernels ops in the graph), the program saved and loaded, run at another size; and the patched
    module itself deep-copied, pickled whole, run under inference_mode."""
    model = small_model("twins_svt_small", depths=SHALLOW)
    patch_model(model, backend="torch")
    x = torch.randn(2, 3, 64, 96)
    batch = torch.export.Dim("batch", min=1, max=64)
    rows, cols = torch.export.Dim("rows", min=2, max=32), torch.export.Dim("cols", min=2, max=32)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch, 2: 32 * rows, 3: 32 * cols}})
    ops = {str(node.target) for node in program.graph.nodes if "twins_kernels" in str(node.target)}
    assert {"twins_kernels.lsa_forward.default", "twins_kernels.gsa_attention_forward.default",
            "twins_kernels.gsa_subsample_forward.default", "twins_kernels.peg_forward.default"} <= ops, ops
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()

    other = torch.randn(1, 3, 96, 128)  # another batch and another size, maps padded differently
    with torch.no_grad():
        expected = model(other)
    torch.testing.assert_close(loaded(other), expected)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with torch.inference_mode():
            torch.testing.assert_close(copied(other), expected)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
def test_torch_jit_trace_records_the_ops_of_a_patched_model_for_every_image_size(tmp_path):
    """timm's sizes reach the modules as 0-d tensors in a trace: the trace records the twins_kernels ops,
    which read each call's map size (not the traced one, as ints handed to an op would be recorded), so
    it runs, forward and backward, as the patched model does at other sizes, the traced one transposed
    among them (the same tokens on a map of another shape), and saves and loads where the package is
    imported."""
    model = small_model("twins_svt_small", depths=SHALLOW).to(KERNEL_DEVICE)
    x = torch.randn(1, 3, 64, 96, device=KERNEL_DEVICE)  # LSA's maps padded: 16x24, 8x12 with ws 7
    patch_model(model)
    traced = torch.jit.trace(model, x)
    recorded = {node.kind() for node in traced.inlined_graph.nodes() if node.kind().startswith("twins_kernels::")}
    assert recorded == {f"twins_kernels::{op}_forward" for op in ("lsa", "gsa_attention", "gsa_subsample", "peg")}
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    for shape in [(1, 3, 64, 96), (1, 3, 96, 64), (2, 3, 72, 40)]:
        other = torch.randn(shape, device=KERNEL_DEVICE)
        with torch.no_grad():
            expected = model(other)
            torch.testing.assert_close(traced(other), expected)
            torch.testing.assert_close(loaded(other), expected)
    other.requires_grad_(True)
    model(other).square().sum().backward()
    expected = [other.grad, *(p.grad for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    other.grad = None
    traced(other).square().sum().backward()  # on the model's parameters (the loaded trace has copies)
    for grad, want in zip([other.grad, *(p.grad for p in model.parameters())], expected, strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_of_a_patched_model_says_what_works_instead():
    model = small_model("twins_svt_small", depths=(1, 1, 1, 1))
    patch_model(model)
    with pytest.raises(RuntimeError, match=r"FusedLSA cannot be compiled by TorchScript.*torch.jit.trace.*"
                                           r"unpatch_model\(model\)"):
        torch.jit.script(model)
    unpatch_model(model)
    torch.jit.script(model)  # the advice holds: timm's modules script


def test_features_only_backbone_and_wrappers():
    backbone = timm.create_model("twins_svt_small", pretrained=False, features_only=True).eval()
    wrapper = nn.Sequential(nn.Identity(), backbone)
    x = torch.randn(1, 3, 64, 96)
    expected = [f.clone() for f in wrapper(x)]
    report = patch_model(wrapper, backend="torch")
    assert report.replaced["peg"] == 4
    for a, b in zip(wrapper(x), expected):
        torch.testing.assert_close(a, b)


def test_fx_feature_extraction_of_a_patched_model():
    """timm's FX feature extraction traces the model symbolically: the fused modules, whose input checks
    cannot take a Proxy, are kept as calls (timm marks its LocallyGroupedAttn so too)."""
    from timm.models import create_feature_extractor

    model = small_model("twins_svt_small")
    x = torch.randn(1, 3, 64, 96)
    expected = create_feature_extractor(model, {"blocks.1.0.attn": "lsa", "norm": "out"})(x)
    patch_model(model, backend="torch")
    features = create_feature_extractor(model, {"blocks.1.0.attn": "lsa", "norm": "out"})(x)
    for name in expected:
        torch.testing.assert_close(features[name], expected[name])


def test_hooks_on_replaced_modules_keep_running():
    """A fused module takes over the hooks of the module it replaces (forward, pre-forward, full backward),
    and a hook registered while patched stays after unpatching; its handle removes it from both."""
    model = nn.Sequential(twins.PosConv(16, 16))
    calls = []
    model[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model[0].register_forward_hook(lambda module, args, out: calls.append("forward"))
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append("backward"))
    patch_model(model, backend="torch")
    x = torch.randn(1, 4 * 5, 16, requires_grad=True)
    model[0](x, (4, 5)).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    handle = model[0].register_forward_hook(lambda module, args, out: calls.append("while patched"))
    unpatch_model(model)
    calls.clear()
    model[0](x, (4, 5)).sum().backward()
    assert calls == ["pre", "forward", "while patched", "backward"]
    handle.remove()
    calls.clear()
    model[0](x, (4, 5))
    assert calls == ["pre", "forward"]


def test_a_module_held_under_two_names_is_patched_under_both():
    shared = twins.LocallyGroupedAttn(32, 2, ws=2)
    holder = nn.Module()
    holder.first, holder.second = shared, shared
    report = patch_model(holder, backend="torch")
    assert report.replaced["lsa"] == 1 and type(holder.first) is FusedLSA and holder.second is holder.first
    assert unpatch_model(holder) == 1 and holder.first is shared and holder.second is shared


@pytest.mark.parametrize("kind", KINDS)
def test_fused_modules_have_every_attribute_of_timms(kind):
    """Code written for timm's module reads the same attributes, with the same values, on the fused one."""
    model = small_model("twins_svt_small")
    path = {"lsa": "blocks.0.0.attn", "gsa": "blocks.0.1.attn", "peg": "pos_block.0"}[kind]
    timm_module = model.get_submodule(path)
    assert type(timm_module) is TIMM_CLASSES[kind]
    patch_model(model, ops=kind)
    fused = model.get_submodule(path)
    for name, value in vars(timm_module).items():
        if not name.startswith("_"):
            assert getattr(fused, name) == value, name


def test_fused_attn_cannot_be_turned_off():
    """timm's explicit-softmax path is not the fused op's: asking for it says so instead of changing nothing."""
    fused = FusedLSA(32, 2, ws=7)
    fused.fused_attn = True
    with pytest.raises(ValueError, match="FusedLSA always runs its fused attention: fused_attn=False"):
        fused.fused_attn = False
    assert fused.fused_attn


def test_a_misspelt_backend_is_refused_where_it_is_given():
    with pytest.raises(ValueError, match=r"patch_model\(backend=...\): unknown backend 'trition'"):
        patch_model(small_model("twins_svt_small"), backend="trition")
    with pytest.raises(ValueError, match=r"FusedLSA\(backend=...\): unknown backend 'trition'"):
        FusedLSA(64, 2, ws=7, backend="trition")
    with pytest.raises(ValueError, match=r"FusedPEG.from_module\(backend=...\): unknown backend 'trition'"):
        FusedPEG.from_module(twins.PosConv(16, 16), backend="trition")


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
    with pytest.raises(RuntimeError, match="inside"), patched(model):
        raise RuntimeError("inside")
    assert not any(type(m) in (FusedLSA, FusedPEG) for m in model.modules()), "unpatched on an exception too"
    with pytest.raises(ValueError, match="conv"):
        patch_model(model, ops=("conv",))
    assert set(patch_model(model, ops="peg").replaced) == {"peg"}, "one kind by name, not its letters"


def test_train_and_eval_mode_follow_the_model_both_ways():
    """A patched model switched to training and back, or the other way, unpatches into modules in its
    mode (the originals were out of the tree while it switched)."""
    for mode in (True, False):
        model = small_model("twins_svt_small").train(not mode)
        patch_model(model)
        model.train(mode)
        unpatch_model(model)
        assert all(m.training == mode for m in model.modules())


def test_context_manager_leaves_earlier_patches_in_place():
    model = small_model("twins_svt_small")
    patch_model(model, ops=("lsa",))
    lsa_modules = [m for m in model.modules() if isinstance(m, FusedLSA)]
    with patched(model) as report:
        assert set(report.replaced) == {"gsa", "peg"}
        assert len(report.inserted) == sum(report.replaced.values())
        assert count(model, twins.LocallyGroupedAttn) == count(model, twins.PosConv) == 0
    assert [m for m in model.modules() if isinstance(m, FusedLSA)] == lsa_modules
    assert count(model, twins.PosConv) == 4 and count(model, twins.GlobalSubSampleAttn) > 0
    assert unpatch_model(model) == len(lsa_modules)


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


# The README's worked example of the extension point (its fused module and converter), run as it is written
# there; the registration and patching that end it are the test's first lines.
README_EXAMPLE, README_EXAMPLE_END = readme_python_block("register_patch(PosCNN").split("\nregister_patch(")
_readme_definitions = {}
exec(README_EXAMPLE, _readme_definitions)
FusedPosCNN, convert_poscnn = _readme_definitions["FusedPosCNN"], _readme_definitions["convert_poscnn"]


def test_register_patch_for_another_implementation():
    assert README_EXAMPLE_END == 'PosCNN, "peg", convert_poscnn)\ntwins_kernels.patch_model(model)\n'
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


def test_a_converters_new_module_takes_the_mode_of_the_one_it_replaces():
    register_patch(PosCNN, "peg", lambda module, backend: FusedPosCNN(24, 24))  # a new module, in training
    try:
        model = nn.ModuleList([PosCNN(24, 24)]).eval()
        patch_model(model)
        assert isinstance(model[0], FusedPosCNN) and not model[0].training
    finally:
        del _registry[PosCNN]


def test_a_users_registration_of_a_timm_class_stays(monkeypatch):
    """timm's classes are registered on the first patch_model; a register_patch of one of them made
    before that stays, and its converter runs."""
    monkeypatch.setattr(twins_kernels.patch, "_registry", {})
    monkeypatch.setattr(twins_kernels.patch, "_builtins_registered", False)
    converted = []

    def convert(module, backend):
        converted.append(module)
        return FusedPEG.from_module(module, backend)

    register_patch(twins.PosConv, "peg", convert)
    model = nn.ModuleList([twins.PosConv(16, 16), twins.LocallyGroupedAttn(16, 2, ws=7)])
    original = model[0]
    report = patch_model(model)
    assert converted == [original] and dict(report.replaced) == {"peg": 1, "lsa": 1}


def test_threads_patching_while_the_builtins_register_replace_everything(monkeypatch):
    """A thread that patches while another is registering timm's classes patches every module too."""
    monkeypatch.setattr(twins_kernels.patch, "_registry", {})
    monkeypatch.setattr(twins_kernels.patch, "_builtins_registered", False)
    register_timm_classes = twins_kernels.patch._register_timm_classes
    first_inside, second_done = threading.Event(), threading.Event()

    def slow_registration():  # the first thread stays inside until the second has patched
        if not first_inside.is_set():
            first_inside.set()
            second_done.wait(10)
        register_timm_classes()

    monkeypatch.setattr(twins_kernels.patch, "_register_timm_classes", slow_registration)
    models = [nn.ModuleList([twins.PosConv(16, 16)]) for _ in range(2)]
    reports = [None, None]

    def patch(i):
        reports[i] = patch_model(models[i])

    first = threading.Thread(target=patch, args=(0,))
    first.start()
    first_inside.wait(10)
    patch(1)
    second_done.set()
    first.join()
    assert [dict(report.replaced) for report in reports] == [{"peg": 1}, {"peg": 1}]


def test_report_names_what_it_cannot_replace_and_dropout():
    """Nothing passes in silence: a registered module at the root (no parent to hold its replacement), a
    subclass of a registered class (its forward may differ), and attention dropout (the reference path
    in training) are in the report."""
    report = patch_model(twins.PosConv(16, 16))
    assert not report.replaced and report.skipped[0][0] == "(the model itself)"

    class ScaledPosConv(twins.PosConv):
        pass

    model = nn.ModuleList([ScaledPosConv(16, 16), twins.PosConv(16, 16), twins.LocallyGroupedAttn(16, 2, 0.1, ws=7)])
    report = patch_model(model)
    assert dict(report.replaced) == {"peg": 1, "lsa": 1}
    assert [name for name, _ in report.skipped] == ["0"] and "ScaledPosConv subclasses PosConv" in report.skipped[0][1]
    assert report.notes == ["2: attn_drop=0.1 runs the reference path in training mode"]
    assert "left alone: 0: ScaledPosConv" in str(report)
    assert patch_model(nn.ModuleList([ScaledPosConv(16, 16)]), ops=("lsa",)).skipped == [], "not a kind asked for"


def test_register_patch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        register_patch(PosCNN, "attention", convert_poscnn)
    with pytest.raises(TypeError, match="nn.Module"):
        register_patch(int, "peg", convert_poscnn)


@requires_gpu
def test_cuda_graph_capture_with_reduce_overhead():
    """The captured graph, replayed on a new input, is as close to the float64 model as eager is. Not
    equal to eager: inductor fuses the ops between the kernels and rounds to bf16 in other places, and
    a whole model in bf16 is about 1e-2 off (see model_parity)."""
    model = small_model("twins_svt_small").cuda().to(torch.bfloat16)
    reference = copy.deepcopy(model).to(torch.float64)
    patch_model(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up runs, then the capture
            compiled(torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        replayed = compiled(x).clone()
        eager = model(x)
        expected = reference(x.double())
    assert rel_err(replayed, expected) <= max(TOLERANCE[torch.bfloat16], 2 * rel_err(eager, expected))


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


@requires_gpu
def test_compiled_training_step_matches_eager():
    """A training step of the patched model under inductor (what the benchmarks' compiled training cases
    run): the custom ops' backwards inside AOTAutograd's joint graph, every parameter gradient as eager's."""
    model = small_model("twins_svt_small", num_classes=10, depths=SHALLOW).cuda().train()
    patch_model(model)
    x = torch.randn(2, 3, 64, 96, device="cuda")
    target = torch.randint(0, 10, (2,), device="cuda")

    def gradients(forward):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(x), target).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = gradients(model)
    torch._dynamo.reset()
    actual = gradients(torch.compile(model, fullgraph=True))
    errors = {name: rel_err(actual[name], expected[name]) for name in expected}
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda item: -item[1])[:5]
