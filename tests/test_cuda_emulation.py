"""The CUDA kernels (csrc/attention.cuh and attention_mma.cuh with the LSA and GSA geometries,
csrc/peg_kernels.cuh) run on the CPU.

tests/cuda_emulation/emulate.h stands in for CUDA's execution model (blocks in turn, a block's threads as
fibers taking turns between barriers in __syncthreads, __shared__ arrays as statics, warps exchanging
registers for __shfl_xor_sync and mma.sync), so g++ builds the very kernel code nvcc builds; the harnesses
run forward and backward in fp32, fp16 and bf16 (c10::Half and c10::BFloat16, the types the extension
dispatches to), the attention with both kernel families (scalar: every dtype; mma, the tensor-core kernels:
fp16 and bf16), and the results are compared with the PyTorch references in float64 on the same (rounded)
inputs. This checks index arithmetic, padding and masking, shared-memory staging, the mma fragment layouts,
the math and the 16-bit loads and stores on machines with no GPU; GPU-only behaviour is the GPU tests' job.
A GPU block's shared memory holds whatever ran there before it, where the emulation's statics start at
zero: so each attention case runs after the same kernels ran on NaN inputs at their tiles' full width,
and a kernel that reads a shared element it did not write meets NaN there (attention_harness.cpp).

A subset also runs under ThreadSanitizer: there the emulated threads of a block are OS threads ordered only by
the emulated barriers, so a shared-memory access that a missing or misplaced ``__syncthreads`` leaves
unordered (a race on the GPU, where it shows as wrong numbers once in a while) is reported, and fails the
case, whether or not this run's timing happened to corrupt a value; and under AddressSanitizer, which
reports an access outside the buffers (an illegal address, or another allocation's data, on the GPU).
And every case runs its blocks in grid order and in reverse, which must give the same bits: blocks that
write the same element, or read what another block writes, race on the GPU, where blocks run in no set
order.
"""
import os
import subprocess

import numpy as np
import pytest
import torch

from twins_kernels.ops import gsa_attention_reference, lsa_reference, peg_reference
from twins_kernels.ops.lsa import _reference_forward as _lsa_reference_forward

from conftest import HAS_GPU, ROOT, emulation_compiler, held_across_workers, shared_tmp_dir
from cuda_host_emulation import KERNELS_AND_DTYPES
from parity import DTYPE_IDS, TOLERANCE, rel_err

# Where there is a GPU the cuda backend's tests run the kernels themselves, and the emulation (which CI
# runs) would only spend a device session's minutes on the CPU.
pytestmark = pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the cuda backend's tests run the kernels")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)


# g++ flags of the sanitized harness builds: ThreadSanitizer reports accesses of a block's threads that no
# barrier orders; AddressSanitizer (with UndefinedBehaviorSanitizer) reports accesses outside the input
# and output buffers or the shared-memory arrays, and undefined arithmetic such as overflowing int offsets
SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def sanitizer_reason(tmp_path_factory, sanitizer):
    """Why this g++ cannot build and run a program under ``sanitizer`` here, or None when it can."""
    directory = tmp_path_factory.mktemp(f"{sanitizer}_probe")
    (directory / "probe.cpp").write_text("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
    built = subprocess.run([emulation_compiler(fibers=False), "-std=c++20", *SANITIZERS[sanitizer], "-pthread", "-o",
                            str(directory / "probe"), str(directory / "probe.cpp")], capture_output=True, text=True)
    if built.returncode != 0:
        return f"g++ cannot build with {SANITIZERS[sanitizer][0]} (runtime library missing?): {built.stderr[-300:]}"
    ran = subprocess.run([str(directory / "probe")], capture_output=True, text=True)
    if ran.returncode != 0:  # e.g. ThreadSanitizer's "unexpected memory mapping" under more ASLR bits than it knows
        return f"{sanitizer} sanitizer programs do not run on this machine: {ran.stderr.strip()[-300:]}"
    return None


def compile_emulated(source, binary, sanitizer: str | None = None):
    """g++ builds ``source`` (with emulate.h and csrc/ on its include path) into ``binary``, under one
    of SANITIZERS if ``sanitizer`` names it."""
    from torch.utils.cpp_extension import include_paths

    folders = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_emulation"), *include_paths()]
    includes = [flag for path in folders for flag in ("-I", path)]
    # -g1: the line tables a sanitizer's report needs, at 40 s for the attention harness where -g takes 55
    optimization = ["-O1", "-g1", *SANITIZERS[sanitizer]] if sanitizer else ["-O2"]
    compiler = emulation_compiler(fibers=sanitizer is None)
    subprocess.run([compiler, "-std=c++20", *optimization, "-pthread", *includes, "-o", str(binary), str(source)],
                   check=True)


def build(tmp_path_factory, name: str, sanitizer: str | None = None):
    """The harness ``name`` built with g++, under one of SANITIZERS if ``sanitizer`` names it: once a
    pytest run, by the first pytest-xdist worker that needs it (a sanitized build takes 10-40 s)."""
    binary = shared_tmp_dir(tmp_path_factory) / f"{name}-{sanitizer or 'optimized'}"
    with held_across_workers(tmp_path_factory, binary.name):
        if not binary.exists():
            partial = binary.with_suffix(".partial")  # a failed build leaves no binary for the next worker
            compile_emulated(os.path.join(ROOT, "tests", "cuda_emulation", f"{name}.cpp"), partial, sanitizer)
            partial.rename(binary)
    return binary


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build(tmp_path_factory, "attention_harness")


@pytest.fixture(scope="module")
def peg_harness(tmp_path_factory):
    return build(tmp_path_factory, "peg_harness")


@pytest.fixture(scope="module", params=list(SANITIZERS))
def sanitizer(request, tmp_path_factory):
    """Each of SANITIZERS, probed once for both harnesses; skips where g++ cannot use it here."""
    if reason := sanitizer_reason(tmp_path_factory, request.param):
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def sanitized_harness(sanitizer, tmp_path_factory):
    return build(tmp_path_factory, "attention_harness", sanitizer)


@pytest.fixture(scope="module")
def sanitized_peg_harness(sanitizer, tmp_path_factory):
    return build(tmp_path_factory, "peg_harness", sanitizer)


def run_harness(harness, tmp_path, inputs, mode, args, sizes, both_orders=False):
    """Run ``harness MODE... IN OUT ARGS...`` on ``inputs`` (``mode``: what comes before the files, ending
    with the dtype name, or the kernel family); returns its fp32 outputs split by ``sizes``. A harness
    that fails (an emulated fault, or what a sanitizer reports) fails the test with its stderr.
    ``both_orders``: run the blocks in reverse too, and require the very same bits from both orders."""
    (tmp_path / "in.bin").write_bytes(b"".join(t.float().contiguous().numpy().tobytes() for t in inputs))
    results = []
    for order in ["grid", "reversed"] if both_orders else ["grid"]:
        out = tmp_path / f"out-{order}.bin"
        ran = subprocess.run([str(harness), *mode, tmp_path / "in.bin", out, *map(str, args)], capture_output=True,
                             text=True, timeout=600, env=os.environ | {"TWINS_KERNELS_EMULATION_BLOCKS": order})
        command = f"{harness.name} {' '.join(mode)} {args}"
        assert ran.returncode == 0, f"{command} exited {ran.returncode}:\n{ran.stderr[-6000:]}"
        results.append(out.read_bytes())
    assert results.count(results[0]) == len(results), "blocks run in reverse give other bits: blocks race"
    flat = np.frombuffer(results[0], dtype=np.float32)
    assert flat.size == sum(sizes)
    return [torch.from_numpy(part.copy()) for part in np.split(flat, np.cumsum(sizes)[:-1])]


def randn(*shape, dtype):
    """fp32 values that ``dtype`` holds exactly: the kernels and the float64 reference see the same numbers."""
    return torch.randn(*shape).to(dtype).float()


# (batch, height, width, heads, head_dim, ws)
MOSTLY_PADDED = "2x1-ws8-mostly-padded"
LSA_SHAPES = {
    "13x17-ws7-padded": (2, 13, 17, 2, 32, 7),
    "14x14-ws7-exact": (1, 14, 14, 1, 64, 7),
    "9x10-ws9-81-slots": (1, 9, 10, 2, 16, 9),
    "5x3-ws4-hd128": (1, 5, 3, 1, 128, 4),
    # 256 slots, 4 query blocks of the mma kernels; rows 10..15 padded: in mask mode a whole key tile is excluded
    "10x16-ws16-hd48": (1, 10, 16, 1, 48, 16),
    # rows of 3C = 120 values: every other token's row is not 16-byte aligned (element-wise staging)
    "6x5-ws3-hd20-unaligned": (1, 6, 5, 2, 20, 3),
    # an odd head_dim: a head's last column is a tile's odd one (the mma kernels' column bounds)
    "6x5-ws3-hd17-odd": (1, 6, 5, 2, 17, 3),
    # in zero mode 62 of 64 keys are the bias: delta must come from P dP, not the 16-bit out (mma dq)
    MOSTLY_PADDED: (1, 2, 1, 1, 16, 8),
}
# (batch, tokens, keys, heads, head_dim, query_splits); query_splits: key blocks sharing a key tile's
# queries (gsa.cu picks it from the GPU's SM count)
NEAR_IDENTICAL_VALUES = "N16-M2-near-identical-values"
FAR_NEGATIVE_LOGITS = "N20-M9-logits-near--120"
GSA_SHAPES = {
    "N150-M40": (2, 150, 40, 2, 32, 1),  # several query blocks, keys past one staging tile
    "N150-M40-2-splits": (2, 150, 40, 2, 32, 2),  # splits of 128 and 22 queries
    "M1": (1, 20, 1, 1, 64, 1),
    "sr1-N130-3-splits": (1, 130, 130, 1, 16, 3),  # online softmax over 3 key tiles
    "hd128": (1, 33, 7, 2, 128, 1),  # the mma dk/dv kernel's 16-query tiles (3 of them)
    "hd128-M40": (1, 20, 40, 1, 128, 1),  # the mma forward's 32-key tiles (2 of them) and dq's 16-key ones (3)
    "hd36-unaligned": (1, 70, 9, 1, 36, 1),  # rows of 36 (q) and 72 (kv) values
    "hd17-odd": (1, 20, 7, 2, 17, 1),
    # every logit's exp underflows: only exp(s - the running max) does not (a running max that starts at 0
    # instead of -inf gives 0 / 0)
    FAR_NEGATIVE_LOGITS: (1, 20, 9, 1, 16, 1),
    # values 1% apart: dP - delta cancels, so delta must come from P dP, not the 16-bit out (mma dq)
    NEAR_IDENTICAL_VALUES: (1, 16, 2, 1, 16, 1),
}
# (batch, height, width, chans)
PEG_SHAPES = {
    "5x7-C40": (2, 5, 7, 40),  # 16-byte channel vectors in every dtype
    "1x9-C300-two-blocks": (1, 1, 9, 300),
    "W1": (3, 4, 1, 33),  # rows of 33 channels: one channel a thread
    "601-rows": (1, 601, 2, 16),  # past the weight gradient's 512 row blocks: 2 rows a block, the last 1
}

# The cases' attention scale is not head_dim ** -0.5 (the ops take any scale): a kernel that used the
# default instead of its argument fails
SCALE_OF_HEAD_DIM = 0.8


def shapes(table):
    return pytest.mark.parametrize("shape", [pytest.param(value, id=key) for key, value in table.items()])


def check_lsa(harness, tmp_path, shape, pad_mode, kernels, dtype, both_orders=False, layout="token-major"):
    batch, height, width, heads, head_dim, ws = shape
    tol = TOLERANCE[dtype]
    chans = heads * head_dim
    tokens = height * width
    qkv = randn(batch, tokens, 3 * chans, dtype=dtype)
    bias = randn(3 * chans, dtype=dtype)
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    scale = SCALE_OF_HEAD_DIM * head_dim ** -0.5
    # the windows with padded slots (lsa_geometry.cuh's padded_windows): the last row's, the last column's
    padded_rows, padded_cols = height % ws != 0, width % ws != 0
    windows_h, windows_w = -(-height // ws), -(-width // ws)
    padded_windows = batch * ((windows_w if padded_rows else 0) + (windows_h - padded_rows if padded_cols else 0))
    out, lse, grad_qkv, pad_grad = run_harness(
        harness, tmp_path, [qkv, bias, grad_out], ["lsa", DTYPE_IDS[dtype], kernels],
        [batch, height, width, chans, heads, ws, repr(scale), int(pad_mode == "mask"), layout],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * 3 * chans,
         padded_windows * heads * ws * ws * 2 * head_dim], both_orders)

    qkv64, bias64 = qkv.double().requires_grad_(), bias.double().requires_grad_()
    expected = lsa_reference(qkv64, bias64, (height, width), heads, ws, scale, pad_mode)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_qkv.view(batch, tokens, 3 * chans), qkv64.grad) <= tol
    # the host code's reduction of the padded keys' share: per head, k and v halves of the bias
    share = pad_grad.view(padded_windows, heads, ws * ws, 2, head_dim).sum((0, 2)).permute(1, 0, 2).reshape(-1)
    grad_bias = torch.cat([torch.zeros(chans), share])
    if bias64.grad is not None and bias64.grad.norm() > 0:  # None: no padded slot read the bias
        assert rel_err(grad_bias, bias64.grad) <= tol
    else:
        assert grad_bias.abs().max() == 0
    _, expected_lse = _lsa_reference_forward(qkv64.detach(), bias64.detach(), height, width, ws, heads, scale,
                                             pad_mode == "mask")
    assert rel_err(lse.view(batch, heads, tokens), expected_lse) <= tol


def check_gsa(harness, tmp_path, shape, kernels, dtype, both_orders=False, layout="token-major"):
    batch, tokens, keys, heads, head_dim, query_splits = shape
    tol = TOLERANCE[dtype]
    chans = heads * head_dim
    q = randn(batch, tokens, chans, dtype=dtype)
    kv = randn(batch, keys, 2 * chans, dtype=dtype)
    if shape == GSA_SHAPES[NEAR_IDENTICAL_VALUES]:
        kv[..., chans:] = (torch.randn(batch, 1, chans) + 0.01 * torch.randn(batch, keys, chans)).to(dtype).float()
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    scale = SCALE_OF_HEAD_DIM * head_dim ** -0.5
    if shape == GSA_SHAPES[FAR_NEGATIVE_LOGITS]:
        # channel 0 puts every logit near -120 (its values, 1 and -600, exact in every dtype; a key part all
        # keys share cancels in dq, so it is small), the others spread them by about one
        kv[..., 0] = 1.0
        q[..., 0] = -120 / scale
    out, lse, grad_q, grad_kv = run_harness(
        harness, tmp_path, [q, kv, grad_out], ["gsa", DTYPE_IDS[dtype], kernels],
        [batch, tokens, keys, chans, heads, repr(scale), query_splits, layout],
        [batch * tokens * chans, batch * heads * tokens, batch * tokens * chans, batch * keys * 2 * chans], both_orders)

    q64, kv64 = q.double().requires_grad_(), kv.double().requires_grad_()
    expected = gsa_attention_reference(q64, kv64, heads, scale)
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_kv.view(batch, keys, 2 * chans), kv64.grad) <= tol
    if keys > 1:
        assert rel_err(grad_q.view(batch, tokens, chans), q64.grad) <= tol
    else:  # with one key the output does not depend on q: its gradient is rounding noise (of out, in 16 bits)
        assert torch.isfinite(grad_q).all() and grad_q.norm() <= tol * grad_kv.norm()
    expected_lse = torch.logsumexp(scale * torch.einsum("bnhd,bmhd->bhnm", q64.view(batch, tokens, heads, -1),
                                                        kv64[..., :chans].reshape(batch, keys, heads, -1)), -1)
    assert rel_err(lse.view(batch, heads, tokens), expected_lse) <= tol


def check_peg(peg_harness, tmp_path, shape, dtype, both_orders=False, max_row_blocks=65535, x_layout="token-major",
              x_offset=0, has_bias=True):
    batch, height, width, chans = shape
    tol = TOLERANCE[dtype]
    tokens = height * width
    x = randn(batch, tokens, chans, dtype=dtype)
    weight = randn(chans, 1, 3, 3, dtype=dtype)  # a module's parameters in dtype, widened by peg.cu
    bias = randn(chans, dtype=dtype)
    grad_out = randn(batch, tokens, chans, dtype=dtype)
    out, grad_x, sums = run_harness(
        peg_harness, tmp_path, [x, weight.reshape(chans, 9), bias, grad_out], [DTYPE_IDS[dtype]],
        [batch, height, width, chans, max_row_blocks, x_layout, x_offset, "bias" if has_bias else "no-bias"],
        [batch * tokens * chans] * 2 + [10 * chans], both_orders)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    expected = peg_reference(x64, w64, b64 if has_bias else None, (height, width))
    expected.backward(grad_out.double())
    assert rel_err(out.view(batch, tokens, chans), expected) <= tol
    assert rel_err(grad_x.view(batch, tokens, chans), x64.grad) <= tol
    sums = sums.view(10, chans)
    assert rel_err(sums[:9].t().reshape(chans, 1, 3, 3), w64.grad) <= tol
    assert rel_err(sums[9], grad_out.double().sum((0, 1))) <= tol  # the bias gradient, computed either way


@shapes(LSA_SHAPES)
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@KERNELS_AND_DTYPES
def test_emulated_lsa_kernels_match_the_reference(harness, tmp_path, shape, pad_mode, kernels, dtype):
    check_lsa(harness, tmp_path, shape, pad_mode, kernels, dtype, both_orders=True)


@shapes(GSA_SHAPES)
@KERNELS_AND_DTYPES
def test_emulated_gsa_kernels_match_the_reference(harness, tmp_path, shape, kernels, dtype):
    if shape == GSA_SHAPES[NEAR_IDENTICAL_VALUES] and dtype == torch.float32:
        pytest.skip("fp32: the cancellation amplifies the dot products' own fp32 rounding past the 1e-5 tolerance "
                    "in any fp32 implementation (PyTorch's autograd: 3.2e-5 on such values); the case is about "
                    "the 16-bit out")
    if shape == GSA_SHAPES[FAR_NEGATIVE_LOGITS] and dtype == torch.float32:
        pytest.skip("fp32: logits near -120 carry fp32 rounding of 120 * 2^-24, which their exps turn into "
                    "relative errors near the 1e-5 tolerance in any fp32 implementation; the 16-bit cases run "
                    "the same kernel code")
    check_gsa(harness, tmp_path, shape, kernels, dtype, both_orders=True)


# The attention kernels on channel-major inputs (a permuted tensor's strides: channel stride B N): the
# scalar kernels' strided loads and the mma kernels' element-wise staging of rows that are not contiguous
@pytest.mark.parametrize("op,shape", [
    pytest.param(op, table[name], id=f"{op}-{name}")
    for op, table, name in [("lsa", LSA_SHAPES, "13x17-ws7-padded"), ("lsa", LSA_SHAPES, "5x3-ws4-hd128"),
                            ("gsa", GSA_SHAPES, "N150-M40-2-splits"), ("gsa", GSA_SHAPES, "hd128")]])
@KERNELS_AND_DTYPES
def test_emulated_attention_kernels_read_channel_major_inputs(harness, tmp_path, op, shape, kernels, dtype):
    if op == "lsa":
        check_lsa(harness, tmp_path, shape, "zero", kernels, dtype, layout="channel-major")
    else:
        check_gsa(harness, tmp_path, shape, kernels, dtype, layout="channel-major")


@shapes(PEG_SHAPES)
@DTYPES
def test_emulated_peg_kernels_match_the_reference(peg_harness, tmp_path, shape, dtype):
    check_peg(peg_harness, tmp_path, shape, dtype, both_orders=True)


@pytest.mark.parametrize("x_layout,x_offset", [("channel-major", 0), ("token-major", 1)],
                         ids=["channel-major-x", "x-not-16-byte-aligned"])
@DTYPES
def test_emulated_peg_kernels_read_x_by_its_own_layout(peg_harness, tmp_path, x_layout, x_offset, dtype):
    """x laid out otherwise than grad_out, which the conv and the weight gradient read each by its own
    strides (a channel-major x: the one-channel conv), or x one element past a 16-byte boundary with
    channels that 16-byte vectors would fit (the conv must take one channel a thread: a 16-byte load
    there faults on the GPU)."""
    check_peg(peg_harness, tmp_path, PEG_SHAPES["5x7-C40"], dtype, x_layout=x_layout, x_offset=x_offset)


@pytest.mark.parametrize("x_offset", [0, 1], ids=["16-byte", "scalar"])
@DTYPES
def test_emulated_peg_conv_without_a_bias(peg_harness, tmp_path, x_offset, dtype):
    """The forward's conv kernel built without a bias (a PosConv with bias=False), which peg.cu hands no
    bias pointer: x's own value and the taps, nothing added; 16 bytes of channels a thread and one."""
    check_peg(peg_harness, tmp_path, PEG_SHAPES["5x7-C40"], dtype, x_offset=x_offset, has_bias=False)


@pytest.mark.parametrize("vector", [True, False], ids=["16-byte", "scalar"])
def test_emulated_peg_conv_loops_over_a_row_past_the_grids_blocks(peg_harness, tmp_path, vector):
    """A row of more than grid.y's 65535 blocks of elements (W * C / vec past 16.7M) gets 65535 blocks,
    each looping over its share: here rows of 4 (scalar: 13) blocks capped at 2."""
    shape = (2, 3, 21, 160) if vector else (2, 3, 5, 661)  # fp32: 4 channels a thread where C % 4 == 0
    check_peg(peg_harness, tmp_path, shape, torch.float32, max_row_blocks=2)


# The sanitizers run a case 2-5x slower: these cover every barrier of both kernel families (each removed,
# ThreadSanitizer fails one of them): one and several query tiles and staging rounds (head_dim 128), split
# dk/dv, several key tiles, a whole excluded key tile, 16-byte and element-wise staging, the padded keys'
# bias-gradient shares, a head narrower than the scalar kernels' tiles (hd17), and both PEG paths.
def sanitized(names, table, cases):
    """Parametrize ``names`` ("shape", then the rest) with the cases, each a shape name of ``table`` and values:
    the shape at batch 1 (a sanitizer watches each block's threads and accesses, and another batch's blocks
    run the same code at another offset; 2-3x less time)."""
    def case_id(case):
        return "-".join([case[0], *(DTYPE_IDS[v] if isinstance(v, torch.dtype) else v for v in case[1:])])
    return pytest.mark.parametrize(names, [pytest.param((1, *table[case[0]][1:]), *case[1:], id=case_id(case))
                                           for case in cases])


@sanitized("shape,pad_mode,kernels,dtype", LSA_SHAPES, [
    ("13x17-ws7-padded", "zero", "scalar", torch.float32), ("5x3-ws4-hd128", "zero", "mma", torch.float16),
    ("10x16-ws16-hd48", "mask", "mma", torch.float16), ("6x5-ws3-hd20-unaligned", "mask", "mma", torch.bfloat16),
    ("6x5-ws3-hd17-odd", "mask", "scalar", torch.float16)])
def test_emulated_lsa_kernels_under_sanitizers(sanitized_harness, tmp_path, shape, pad_mode, kernels, dtype):
    check_lsa(sanitized_harness, tmp_path, shape, pad_mode, kernels, dtype)


@sanitized("shape,kernels,dtype", GSA_SHAPES, [
    ("N150-M40-2-splits", "scalar", torch.float32), ("N150-M40-2-splits", "mma", torch.bfloat16),
    ("sr1-N130-3-splits", "mma", torch.float16), ("hd128", "mma", torch.bfloat16)])
def test_emulated_gsa_kernels_under_sanitizers(sanitized_harness, tmp_path, shape, kernels, dtype):
    check_gsa(sanitized_harness, tmp_path, shape, kernels, dtype)


@sanitized("shape,dtype", PEG_SHAPES, [("5x7-C40", torch.bfloat16), ("W1", torch.float32)])
def test_emulated_peg_kernels_under_sanitizers(sanitized_peg_harness, tmp_path, shape, dtype):
    check_peg(sanitized_peg_harness, tmp_path, shape, dtype)


def run_emulated_main(tmp_path, body: str) -> subprocess.CompletedProcess:
    """Build and run a program whose main() is ``body``, under emulate.h."""
    (tmp_path / "program.cpp").write_text(f'#include "emulate.h"\nint main() {{ {body} }}\n')
    compile_emulated(tmp_path / "program.cpp", tmp_path / "program")
    return subprocess.run([tmp_path / "program"], capture_output=True, text=True, timeout=60)


def test_a_barrier_that_a_thread_never_reaches_stops_the_emulation(tmp_path):
    """A block whose thread 5 returns before the barrier the others wait at (a GPU block that never ends):
    the fibers' scheduler finds the block that cannot end and says where (OS threads would hang)."""
    ran = run_emulated_main(tmp_path, "emulated_launch(2, 64, [] { if (threadIdx.x == 5) return; __syncthreads(); });")
    assert ran.returncode != 0
    assert "block 0: thread 0 waits at a barrier that not all of its block's (or warp's) threads reach" in ran.stderr


# Launches a GPU refuses: a block of more than 1024 threads, a grid.y past 65535, no blocks at all
INVALID_LAUNCHES = {
    "1025-threads": "emulated_launch(1, 1025, [] {});",
    "grid-y-65536": "emulated_launch({1, 65536, 0}, {32, 1, 0}, [] {});",
    "no-blocks": "emulated_launch(0, 32, [] {});",
}


@pytest.mark.parametrize("launch", list(INVALID_LAUNCHES.values()), ids=list(INVALID_LAUNCHES))
def test_a_launch_the_gpu_refuses_stops_the_emulation(tmp_path, launch):
    ran = run_emulated_main(tmp_path, launch)
    assert ran.returncode != 0 and "invalid launch configuration" in ran.stderr, ran.stderr


# Warp-wide instructions the GPU leaves undefined: half a warp in an mma.sync while the other half
# shuffles, a shuffle whose mask leaves out lanes that run it
MISMATCHED_WARP_OPS = {
    "mma-against-shuffle": r"""
      if (threadIdx.x < 16) {
        float d[4] = {};
        const uint32_t a[4] = {}, b[2] = {};
        emulated_mma_m16n8k16<c10::Half>(d, a, b);
      } else {
        __shfl_xor_sync(0x0000ffffu, 1.f, 1);
      }""",
    "partial-mask": "__shfl_xor_sync(0x0000ffffu, 1.f, 1);",
}


@pytest.mark.parametrize("body", list(MISMATCHED_WARP_OPS.values()), ids=list(MISMATCHED_WARP_OPS))
def test_lanes_that_disagree_on_a_warp_instruction_stop_the_emulation(tmp_path, body):
    ran = run_emulated_main(tmp_path, f"emulated_launch(1, 32, [] {{ {body} }});")
    assert ran.returncode != 0 and "warp of 32 lanes: lane" in ran.stderr, ran.stderr
