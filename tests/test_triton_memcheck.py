"""Every kernel of every op, forward and backward, under tests/triton_memcheck.py's recorder in the Triton
interpreter: no two programs of a launch touch the same bytes unordered (a race gives the same answer on
every CPU run and a different one, now and then, on a GPU) and no program touches bytes outside its
tensor arguments (a GPU faults, or reads another allocation). The recorder is itself checked on kernels
that have each hazard."""
import pytest
import torch
import triton
import triton.language as tl

from twins_kernels import FusedGSA, FusedLSA, FusedPEG

from conftest import HAS_GPU
from parity import DTYPE_IDS
from triton_memcheck import record_accesses

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the access recorder runs in the Triton interpreter (CPU only)")


@triton.jit
def copy_blocks_kernel(src_ptr, dst_ptr, OVERLAP: tl.constexpr, BLOCK: tl.constexpr):
    """Program p copies src's block p to dst from p * (BLOCK - OVERLAP): OVERLAP elements also written by p + 1."""
    block = tl.arange(0, BLOCK)
    values = tl.load(src_ptr + tl.program_id(0) * BLOCK + block)
    tl.store(dst_ptr + tl.program_id(0) * (BLOCK - OVERLAP) + block, values)


@triton.jit
def read_neighbour_kernel(buf_ptr, BLOCK: tl.constexpr):
    """buf[block p] += buf[block p + 1]: reads what the next program writes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf_ptr + offs, tl.load(buf_ptr + offs) + tl.load(buf_ptr + offs + BLOCK))


@triton.jit
def shift_left_kernel(src_ptr, dst_ptr, n, MASK_THE_LOAD: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = src[i + 1], 0 for the last element; the last load is masked off, or loaded and discarded."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs + 1 < n
    if MASK_THE_LOAD:
        values = tl.load(src_ptr + offs + 1, mask=inside, other=0.0)
    else:
        values = tl.where(inside, tl.load(src_ptr + offs + 1), 0.0)
    tl.store(dst_ptr + offs, values, mask=offs < n)


def test_recorder_passes_disjoint_programs_and_reports_overlapping_ones():
    src = torch.randn(64)
    with record_accesses() as report:
        copy_blocks_kernel[(4,)](src, torch.empty(64), OVERLAP=0, BLOCK=16)
    assert report.launches == {"copy_blocks_kernel": 1} and not report.hazards

    with record_accesses() as report:
        copy_blocks_kernel[(4,)](src, torch.empty(64), OVERLAP=3, BLOCK=16)
    (hazard,) = report.hazards
    assert (hazard.kind, hazard.argument, hazard.bytes) == ("write/write", "`dst_ptr`", 3 * 3 * 4)

    with record_accesses() as report:
        read_neighbour_kernel[(3,)](torch.randn(64), BLOCK=16)
    (hazard,) = report.hazards
    assert (hazard.kind, hazard.argument, hazard.bytes) == ("read/write", "`buf_ptr`", 2 * 16 * 4)
    assert hazard.programs == ((1, 0, 0), (0, 0, 0))  # written by program 1, read by program 0


def test_recorder_reports_a_load_past_the_end_even_when_its_value_is_discarded():
    src = torch.randn(64)[:40]  # a view: the storage's elements past 40 are in bounds
    expected = torch.cat([src[1:], torch.zeros(1)])
    for mask_the_load, past_the_end in [(True, False), (False, False), (False, True)]:
        source = torch.randn(40) if past_the_end else src
        dst = torch.empty(40)
        with record_accesses() as report:
            shift_left_kernel[(3,)](source, dst, 40, MASK_THE_LOAD=mask_the_load, BLOCK=16)
        if not past_the_end:
            assert not report.hazards
            torch.testing.assert_close(dst, expected, rtol=0, atol=0)
        else:  # program 2 loads elements 33..48 of 40: 9 past the end, the first right at it
            (hazard,) = report.hazards
            assert (hazard.kind, hazard.argument, hazard.bytes, hazard.programs) == (
                "out-of-bounds read", "0 bytes past the end of `src_ptr`", 9 * 4, ((2, 0, 0),))


def run_module(module, x, size):
    x = x.requires_grad_()
    out = module(x, size)
    out.backward(torch.randn_like(out))


def assert_no_hazards(report, kernels):
    assert not report.hazards, "\n".join(map(str, report.hazards))
    assert kernels <= set(report.launches), f"launched {sorted(report.launches)}, expected {sorted(kernels)}"


# fp32 and fp16 pick different tiles (fp16: 64-slot LSA key blocks, one dk/dv program a window and head;
# fp32: several, with a separate dq kernel); bf16 runs fp16's tiles.
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)


@DTYPES
@pytest.mark.parametrize("pad_mode", ["zero", "mask"])
@pytest.mark.parametrize("batch,size", [pytest.param(2, (13, 17), id="13x17-padded-B2"),
                                        pytest.param(1, (1, 9), id="1x9-one-row")])
def test_lsa_kernels_have_no_races_or_out_of_bounds_accesses(dtype, pad_mode, batch, size):
    module = FusedLSA(64, num_heads=2, ws=7, pad_mode=pad_mode, backend="triton").to(dtype)
    with record_accesses() as report:
        run_module(module, torch.randn(batch, size[0] * size[1], 64, dtype=dtype), size)
    assert_no_hazards(report, {"lsa_forward_kernel", "lsa_backward_kernel"})


@DTYPES
@pytest.mark.parametrize("sr,size,dq_kernel", [pytest.param(2, (9, 10), False, id="sr2-9x10-floored"),
                                               pytest.param(8, (14, 15), False, id="sr8-M1"),
                                               pytest.param(1, (12, 12), True, id="sr1-split-dkdv")])
def test_gsa_kernels_have_no_races_or_out_of_bounds_accesses(dtype, sr, size, dq_kernel):
    """dq_kernel: the keys are more than one block (M = 144), so dq has its own kernel; else the dk/dv
    kernel computes it."""
    module = FusedGSA(64, num_heads=1, sr_ratio=sr, backend="triton").to(dtype)
    with record_accesses() as report:
        run_module(module, torch.randn(1, size[0] * size[1], 64, dtype=dtype), size)
    expected = {"gsa_attention_forward_kernel", "gsa_attention_dkdv_kernel"}
    if dq_kernel:
        expected.add("gsa_attention_dq_kernel")
    if sr > 1:
        expected |= {"gsa_subsample_forward_kernel", "gsa_subsample_norm_backward_kernel",
                     "gsa_subsample_weight_grad_kernel", "gsa_subsample_input_grad_kernel"}
    assert_no_hazards(report, expected)
    assert ("gsa_attention_dq_kernel" in report.launches) == dq_kernel


@DTYPES
def test_peg_kernels_have_no_races_or_out_of_bounds_accesses(dtype):
    module = FusedPEG(40, 40, backend="triton").to(dtype)
    with record_accesses() as report:
        run_module(module, torch.randn(2, 5 * 7, 40, dtype=dtype), (5, 7))
    assert_no_hazards(report, {"peg_conv3x3_kernel", "peg_weight_grad_kernel"})
