"""Stand-ins of mmsegmentation's Twins modules (mmseg/models/backbones/twins.py and mit.py, 0.x and 1.x):
their constructors, attribute names and forwards verbatim, with mmcv's builders replaced by the torch
modules they build. mmsegmentation needs mmcv, which the GPU machine and CI do not have: the tests check
``patch_model`` on these (tests/test_mmseg.py, tests/test_lsa.py), and the LSA and GSA benchmarks time
them as the ``mmseg`` variant, built by ``from_timm`` with the timm module's weights.
"""
import torch
from timm.layers import DropPath
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn
from torch import nn


def nlc_to_nchw(x, hw_shape):
    H, W = hw_shape
    B, L, C = x.shape
    assert L == H * W, 'The seq_len does not match H, W'
    return x.transpose(1, 2).reshape(B, C, H, W).contiguous()


def nchw_to_nlc(x):
    return x.flatten(2).transpose(1, 2).contiguous()


class LocallyGroupedSelfAttention(nn.Module):
    """1.x's name (0.x: LocallygroupedSelfAttention, below). The forward is also timm's commented-out
    ``forward_mask``. Its mask slices ``-pad_b:`` and ``-pad_r:`` cover the whole map when that pad is 0,
    which disables masking when only one side is padded: pad_mode "mmseg" matches it on every map, "mask"
    where both sides or none are padded. One change: the fp32 mask is cast to the scores' dtype before it
    is added. As mmsegmentation adds it, fp16/bf16 scores become fp32 and ``attn @ v`` fails on fp16/bf16
    weights; under autocast, as mmsegmentation runs fp16, the mask and the softmax run in fp32 (a slower
    baseline than this)."""

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

    def forward(self, x, hw_shape):
        B, N, C = x.shape
        H, W = hw_shape
        x = x.view(B, H, W, C)
        pad_l = pad_t = 0
        pad_r = (self.window_size - W % self.window_size) % self.window_size
        pad_b = (self.window_size - H % self.window_size) % self.window_size
        x = torch.nn.functional.pad(x, (0, 0, pad_l, pad_r, pad_t, pad_b))
        _, Hp, Wp, _ = x.shape
        _h, _w = Hp // self.window_size, Wp // self.window_size
        mask = torch.zeros((1, Hp, Wp), device=x.device)
        mask[:, -pad_b:, :].fill_(1)
        mask[:, :, -pad_r:].fill_(1)

        x = x.reshape(B, _h, self.window_size, _w, self.window_size, C).transpose(2, 3)  # B, _h, _w, ws, ws, C
        mask = mask.reshape(1, _h, self.window_size, _w, self.window_size).transpose(2, 3).reshape(
            1, _h * _w, self.window_size * self.window_size)
        attn_mask = mask.unsqueeze(2) - mask.unsqueeze(3)  # 1, _h*_w, ws*ws, ws*ws
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-1000.0)).masked_fill(attn_mask == 0, float(0.0))
        qkv = self.qkv(x).reshape(B, _h * _w, self.window_size * self.window_size, 3, self.num_heads,
                                  C // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B, _h*_w, n_head, ws*ws, dim_head
        attn = (q @ k.transpose(-2, -1)) * self.scale  # B, _h*_w, n_head, ws*ws, ws*ws
        attn = attn + attn_mask.unsqueeze(2).to(attn.dtype)  # mmsegmentation's mask is fp32 (see above)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        attn = (attn @ v).transpose(2, 3).reshape(B, _h, _w, self.window_size, self.window_size, C)
        x = attn.transpose(2, 3).reshape(B, _h * self.window_size, _w * self.window_size, C)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        x = x.reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


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


class GSAAsEncoderLayerCalls(GlobalSubsampledAttention):
    """A GlobalSubsampledAttention called as mmsegmentation's GSAEncoderLayer calls it: ``attn(x,
    hw_shape, identity=0.)``, its residual added by the layer (so one more elementwise op than timm's)."""

    def forward(self, x, hw_shape):
        return super().forward(x, hw_shape, identity=0.)


def from_timm(module: nn.Module) -> nn.Module:
    """mmsegmentation's counterpart of timm's ``LocallyGroupedAttn`` or ``GlobalSubSampleAttn`` (whose
    Linears all have biases), on its device and dtype, with its weights (copies): the same function of x,
    except the LSA's masking on maps padded on both sides. ``forward(x, hw_shape)``, as mmsegmentation's
    encoder layers call it."""
    weight = module.proj.weight
    state = module.state_dict()
    if isinstance(module, LocallyGroupedAttn):
        mmseg = LocallyGroupedSelfAttention(module.dim, module.num_heads, qkv_bias=True, window_size=module.ws)
    elif isinstance(module, GlobalSubSampleAttn):
        mmseg = GSAAsEncoderLayerCalls(module.dim, module.num_heads, qkv_bias=True, sr_ratio=module.sr_ratio)
        # nn.MultiheadAttention packs q, k and v in one in_proj: q's rows, then kv's (keys, then values;
        # each head's in order, as timm splits them)
        for name in ("weight", "bias"):
            state[f"attn.in_proj_{name}"] = torch.cat([state.pop(f"q.{name}"), state.pop(f"kv.{name}")])
            state[f"attn.out_proj.{name}"] = state.pop(f"proj.{name}")
    else:
        raise TypeError("from_timm takes timm's LocallyGroupedAttn or GlobalSubSampleAttn, "
                        f"not {type(module).__name__}")
    mmseg.load_state_dict(state)
    return mmseg.to(weight.device, weight.dtype).train(module.training)
