"""patch_model on mmsegmentation's Twins modules (twins_kernels.mmseg), against faithful stand-ins of its
0.x and 1.x classes (benchmarks/mmseg_standins.py): what is replaced and when, parity of outputs and every
gradient, checkpoints, attention dropout, torch.compile, and what is left alone."""
import copy
import sys
import types

import pytest
import torch
from torch import nn

import twins_kernels.patch
from twins_kernels import FusedLSA, patch_model, unpatch_model
from twins_kernels.mmseg import FusedMmsegCPE, FusedMmsegGSA
from twins_kernels.testing import ieee_fp32

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, load_benchmarks_module, skip_cuda_unless_available
from parity import DTYPE_IDS, assert_rel_close, check_compiled_matches_eager, check_module_parity, make_tokens

standins = load_benchmarks_module("mmseg_standins.py")  # mmsegmentation's classes
# an mmsegmentation version: its twins module's classes, as patch_model finds them there
VERSIONS = {
    "1.x": {"LocallyGroupedSelfAttention": standins.LocallyGroupedSelfAttention,
            "GlobalSubsampledAttention": standins.GlobalSubsampledAttention,
            "ConditionalPositionEncoding": standins.ConditionalPositionEncoding},
    "0.x": {"LocallygroupedSelfAttention": standins.LocallygroupedSelfAttention,
            "GlobalSubsampledAttention": standins.GlobalSubsampledAttention,
            "ConditionalPositionEncoding": standins.ConditionalPositionEncoding0x},
}


@pytest.fixture
def fresh_registry(monkeypatch):
    """patch_model's registry as on its first call: empty, nothing registered; put back after the test."""
    for name, value in [("_registry", {}), ("_builtins_registered", False), ("_mmseg_registered", False)]:
        monkeypatch.setattr(twins_kernels.patch, name, value)


@pytest.fixture(params=list(VERSIONS))
def mmseg(request, monkeypatch, fresh_registry):
    """mmsegmentation's twins module, imported (a stand-in of it in sys.modules), and a fresh registry."""
    module = types.ModuleType("mmseg.models.backbones.twins")
    for name, cls in VERSIONS[request.param].items():
        setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "mmseg.models.backbones.twins", module)
    return module


class Stage(nn.Module):
    """One of each module, as mmsegmentation's SVT backbone calls them (LSA and GSA in their encoder
    layers' residuals, GSA with ``identity=0.``; the CPE after the first layer)."""

    def __init__(self, mmseg, dim=32, heads=2, qkv_bias=True, qk_scale=None, sr_ratio=2):
        super().__init__()
        self.lsa = lsa_class(mmseg)(dim, heads, qkv_bias=qkv_bias, qk_scale=qk_scale, window_size=7)
        self.cpe = mmseg.ConditionalPositionEncoding(dim, dim)
        self.gsa = mmseg.GlobalSubsampledAttention(dim, heads, dropout_layer=dict(type="DropPath", drop_prob=0.1),
                                                   qkv_bias=qkv_bias, sr_ratio=sr_ratio)
        self.cpe_takes_h_and_w = mmseg.ConditionalPositionEncoding is standins.ConditionalPositionEncoding0x

    def forward(self, x, hw_shape):
        x = x + self.lsa(x, hw_shape)
        x = self.cpe(x, *hw_shape) if self.cpe_takes_h_and_w else self.cpe(x, hw_shape)
        return x + self.gsa(x, hw_shape, identity=0.)


def lsa_class(mmseg):
    return getattr(mmseg, "LocallyGroupedSelfAttention", None) or mmseg.LocallygroupedSelfAttention


def patched_copy(backend):
    def patch(module):
        report = patch_model(module, backend=backend)
        assert dict(report.replaced) == {"lsa": 1, "gsa": 1, "peg": 1} and not report.skipped, str(report)
        return module
    return patch


# maps padded at the right, at the bottom, on both sides (LSA masked on the last alone); sub-sampled by 2 with
# a remainder, by 4, and not at all
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("height,width,sr_ratio,qkv_bias,qk_scale",
                         [(14, 10, 2, True, None), (9, 14, 4, False, None), (13, 17, 1, True, 0.3)])
def test_patched_modules_keep_outputs_and_gradients(mmseg, backend, dtype, height, width, sr_ratio, qkv_bias,
                                                     qk_scale):
    skip_cuda_unless_available(backend)
    stage = Stage(mmseg, qkv_bias=qkv_bias, qk_scale=qk_scale, sr_ratio=sr_ratio).eval()
    x = make_tokens(2, height, width, 32, dtype, KERNEL_DEVICE)
    check_module_parity(stage, patched_copy(backend), x, (height, width), dtype)


def test_patching_keeps_the_state_dict_and_unpatching_restores(mmseg):
    stage = Stage(mmseg).eval()
    originals = dict(stage.named_children())
    state = copy.deepcopy(stage.state_dict())
    report = patch_model(stage)
    assert str(report) == "replaced: 1 lsa, 1 gsa, 1 peg"
    assert type(stage.lsa) is FusedLSA and stage.lsa.pad_mode == "mmseg" and stage.lsa.ws == 7
    assert type(stage.gsa) is FusedMmsegGSA and type(stage.cpe) is FusedMmsegCPE
    assert stage.gsa.attn is originals["gsa"].attn and stage.cpe.proj is originals["cpe"].proj
    patched_state = stage.state_dict()
    assert list(patched_state) == list(state)
    assert all(torch.equal(patched_state[key], value) for key, value in state.items())
    unpatched = Stage(mmseg)
    unpatched.load_state_dict(patched_state)  # a patched model's checkpoint loads into mmsegmentation's
    stage.load_state_dict(unpatched.state_dict())  # and back
    assert unpatch_model(stage) == 3
    assert dict(stage.named_children()) == originals


def test_nothing_of_mmseg_is_patched_before_its_twins_module_is_imported(monkeypatch, fresh_registry):
    monkeypatch.delitem(sys.modules, "mmseg.models.backbones.twins", raising=False)
    model = nn.ModuleList([standins.GlobalSubsampledAttention(32, 2, sr_ratio=2),
                           standins.ConditionalPositionEncoding(32, 32)])
    assert patch_model(model).replaced == {}
    assert "mmseg.models.backbones.twins" not in sys.modules, "patch_model must not import mmsegmentation"
    module = types.ModuleType("mmseg.models.backbones.twins")
    module.GlobalSubsampledAttention = standins.GlobalSubsampledAttention
    module.ConditionalPositionEncoding = standins.ConditionalPositionEncoding
    monkeypatch.setitem(sys.modules, "mmseg.models.backbones.twins", module)
    assert dict(patch_model(model).replaced) == {"gsa": 1, "peg": 1}


def test_what_the_fused_modules_cannot_compute_is_left_alone_with_the_reason(mmseg):
    without_norm = mmseg.GlobalSubsampledAttention(32, 2, sr_ratio=2)
    without_norm.norm = nn.BatchNorm1d(32)
    with_bias_kv = mmseg.GlobalSubsampledAttention(32, 2)
    with_bias_kv.attn = nn.MultiheadAttention(32, 2, add_bias_kv=True)
    without_sr_bias = mmseg.GlobalSubsampledAttention(32, 2, sr_ratio=2)
    without_sr_bias.sr = nn.Conv2d(32, 32, 2, 2, bias=False)
    model = nn.ModuleList([
        lsa_class(mmseg)(32, 2, window_size=1),
        mmseg.GlobalSubsampledAttention(32, 2, batch_first=False),
        without_norm,
        with_bias_kv,
        without_sr_bias,
        mmseg.ConditionalPositionEncoding(32, 32, stride=2),
        mmseg.ConditionalPositionEncoding(64, 32),
        mmseg.GlobalSubsampledAttention(32, 2, sr_ratio=4, qkv_bias=False),
    ])
    report = patch_model(model)
    assert dict(report.replaced) == {"gsa": 1}
    assert report.skipped == [
        ("0", "window_size=1: windows of one token"),
        ("1", "batch_first=False"),
        ("2", "norm is BatchNorm1d, not a LayerNorm with weight and bias"),
        ("3", "its nn.MultiheadAttention has kdim/vdim, add_bias_kv or add_zero_attn"),
        ("4", "its sr conv has no bias"),
        ("5", "stride 2: only stride 1 is fused"),
        ("6", "in_channels 64 != embed_dims 32: only depthwise is fused"),
    ]
    with pytest.raises(ValueError, match="batch_first=False"):
        FusedMmsegGSA.from_module(model[1])


def test_attention_dropout_in_training_runs_the_reference_and_is_reported(mmseg):
    gsa = mmseg.GlobalSubsampledAttention(32, 2, attn_drop=0.5, sr_ratio=2)
    model = nn.ModuleList([gsa])
    report = patch_model(model, backend="triton")
    assert report.notes == ["0: attn_drop=0.5 runs the reference path in training mode"]
    x = make_tokens(1, 6, 6, 32, torch.float32, KERNEL_DEVICE)
    model.to(KERNEL_DEVICE)
    torch.manual_seed(0)
    first = model[0](x, (6, 6))
    assert not torch.equal(first, model[0](x, (6, 6))), "attention dropout must draw anew each call"
    model.eval()
    with torch.no_grad(), ieee_fp32():  # no TF32 in the stand-in's sr conv on a GPU
        assert_rel_close(model[0](x, (6, 6)), gsa(x, (6, 6)), torch.float32, "in eval, no dropout")


def test_a_patched_stage_compiles_to_one_graph_across_map_sizes(mmseg):
    """No graph break, and no recompile for a new map size, padded or not. The backend is the reference:
    a graph holds the same twins_kernels ops whichever backend they run (test_lsa and test_gsa compile the
    kernels' backends), and the interpreter would take half a minute."""
    stage = Stage(mmseg).to(KERNEL_DEVICE).eval()
    patch_model(stage, backend="torch")
    inputs = [(make_tokens(1, height, width, 32, torch.float32, KERNEL_DEVICE), (height, width))
              for height, width in [(14, 10), (9, 14), (13, 17)]]
    check_compiled_matches_eager(stage, inputs, "aot_eager", dynamic=True)
