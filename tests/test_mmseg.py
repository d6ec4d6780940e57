"""patch_model on mmsegmentation's Twins modules (twins_kernels.mmseg), against faithful stand-ins of its
0.x and 1.x classes: what is replaced and when, parity of outputs and every gradient, checkpoints,
attention dropout, torch.compile, and what is left alone."""
import copy
import sys
import types

import pytest
import torch
from timm.layers import DropPath
from torch import nn

import twins_kernels.patch
from twins_kernels import FusedLSA, patch_model, unpatch_model
from twins_kernels.mmseg import FusedMmsegCPE, FusedMmsegGSA
from twins_kernels.testing import ieee_fp32

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, skip_cuda_unless_available
from parity import DTYPE_IDS, assert_rel_close, check_compiled_matches_eager, check_module_parity, make_tokens
from test_lsa import MmsegMaskedAttn


# --- stand-ins: mmsegmentation's classes (mmseg/models/backbones/twins.py and mit.py), their constructors,
# attribute names and forwards, with mmcv's builders replaced by the torch modules they build ---
def nlc_to_nchw(x, hw_shape):
    H, W = hw_shape
    B, L, C = x.shape
    assert L == H * W, 'The seq_len does not match H, W'
    return x.transpose(1, 2).reshape(B, C, H, W).contiguous()


def nchw_to_nlc(x):
    return x.flatten(2).transpose(1, 2).contiguous()


class LocallyGroupedSelfAttention(nn.Module):
    """1.x's name (0.x: LocallygroupedSelfAttention, below); the forward is test_lsa's verbatim one."""

    def __init__(self, embed_dims, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop_rate=0., proj_drop_rate=0.,
                 window_size=1):
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self.window_size = window_size

    forward = MmsegMaskedAttn.forward


class LocallygroupedSelfAttention(LocallyGroupedSelfAttention):
    pass


class MultiheadAttention(nn.Module):
    """mmcv.cnn.bricks.transformer.MultiheadAttention's constructor (its forward is not used by these)."""

    def __init__(self, embed_dims, num_heads, attn_drop=0., proj_drop=0., dropout_layer=None, batch_first=False,
                 **kwargs):
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, attn_drop, **kwargs)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = DropPath(dropout_layer["drop_prob"]) if dropout_layer else nn.Identity()


class GlobalSubsampledAttention(MultiheadAttention):
    """GlobalSubsampledAttention = EfficientMultiheadAttention (mit.py) with Twins' defaults."""

    def __init__(self, embed_dims, num_heads, attn_drop=0., proj_drop=0., dropout_layer=None, batch_first=True,
                 qkv_bias=True, sr_ratio=1):
        super().__init__(embed_dims, num_heads, attn_drop, proj_drop, dropout_layer=dropout_layer,
                         batch_first=batch_first, bias=qkv_bias)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(embed_dims, embed_dims, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(embed_dims)  # build_norm_layer(dict(type='LN')): eps 1e-5

    def forward(self, x, hw_shape, identity=None):
        x_q = x
        if self.sr_ratio > 1:
            x_kv = nlc_to_nchw(x, hw_shape)
            x_kv = self.sr(x_kv)
            x_kv = nchw_to_nlc(x_kv)
            x_kv = self.norm(x_kv)
        else:
            x_kv = x

        if identity is None:
            identity = x_q

        if self.batch_first:
            x_q = x_q.transpose(0, 1)
            x_kv = x_kv.transpose(0, 1)

        out = self.attn(query=x_q, key=x_kv, value=x_kv)[0]

        if self.batch_first:
            out = out.transpose(0, 1)

        return identity + self.dropout_layer(self.proj_drop(out))


class ConditionalPositionEncoding(nn.Module):
    """1.x's: forward(x, hw_shape)."""

    def __init__(self, in_channels, embed_dims=768, stride=1):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=3, stride=stride, padding=1, bias=True,
                              groups=embed_dims)
        self.stride = stride

    def forward(self, x, hw_shape):
        b, n, c = x.shape
        h, w = hw_shape
        feat_token = x
        cnn_feat = feat_token.transpose(1, 2).view(b, c, h, w)
        if self.stride == 1:
            x = self.proj(cnn_feat) + cnn_feat
        else:
            x = self.proj(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        return x


class ConditionalPositionEncoding0x(ConditionalPositionEncoding):
    """0.x's: forward(x, H, W)."""

    def forward(self, x, H, W):
        return super().forward(x, (H, W))


# an mmsegmentation version: its twins module's classes, as patch_model finds them there
VERSIONS = {
    "1.x": {"LocallyGroupedSelfAttention": LocallyGroupedSelfAttention,
            "GlobalSubsampledAttention": GlobalSubsampledAttention,
            "ConditionalPositionEncoding": ConditionalPositionEncoding},
    "0.x": {"LocallygroupedSelfAttention": LocallygroupedSelfAttention,
            "GlobalSubsampledAttention": GlobalSubsampledAttention,
            "ConditionalPositionEncoding": ConditionalPositionEncoding0x},
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
        self.cpe_takes_h_and_w = mmseg.ConditionalPositionEncoding is ConditionalPositionEncoding0x

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
    model = nn.ModuleList([GlobalSubsampledAttention(32, 2, sr_ratio=2), ConditionalPositionEncoding(32, 32)])
    assert patch_model(model).replaced == {}
    assert "mmseg.models.backbones.twins" not in sys.modules, "patch_model must not import mmsegmentation"
    module = types.ModuleType("mmseg.models.backbones.twins")
    module.GlobalSubsampledAttention = GlobalSubsampledAttention
    module.ConditionalPositionEncoding = ConditionalPositionEncoding
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
