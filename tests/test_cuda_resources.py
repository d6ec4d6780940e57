"""Every kernel of the built CUDA extension fits the thread blocks the host code launches it with, checked
without a GPU: registers and static shared memory from cuobjdump, for each architecture it was built for.

A kernel that needs more registers than an SM has for its block fails only at launch ("too many resources
requested"), on the GPU; the scalar attention kernels use up to 255 registers a thread and have no
__launch_bounds__, so a larger block (a larger ws, say) would build and break there. The block sizes are
read from csrc/, where the launches take them.
"""
import os
import re

import pytest

from twins_kernels.ops.lsa import MAX_WS

from conftest import ROOT, extension_cuobjdump

REGISTERS_PER_BLOCK = 65536  # sm_80 and sm_90
REGISTER_ALLOCATION_UNIT = 256  # registers are handed to a warp in units of 256
WARP = 32
STATIC_SHARED_LIMIT = 48 * 1024  # bytes of __shared__ arrays a kernel may declare statically


def csrc_constant(header: str, name: str) -> int:
    text = open(os.path.join(ROOT, "csrc", header)).read()
    match = re.search(rf"constexpr int {name} = (\d+);", text)
    assert match, f"{name} not found in csrc/{header}"
    return int(match.group(1))


def launch_threads(kernel: str) -> int:
    """The most threads a block of ``kernel`` (a mangled name) is launched with."""
    if "mma_attention" in kernel:  # MmaTiles::kThreads: a warp per 16 rows
        return csrc_constant("attention_mma.cuh", "kMmaRows") // 16 * WARP
    if "LsaGeometry" in kernel:  # lsa_scalar_threads(ws): a thread per window slot, whole warps
        return -(-MAX_WS * MAX_WS // WARP) * WARP
    if "GsaGeometry" in kernel:
        return csrc_constant("gsa_geometry.cuh", "kGsaScalarRows")
    if "attention_delta_kernel" in kernel:  # a warp per token
        return csrc_constant("attention.cuh", "kDeltaWarps") * WARP
    if "peg_conv3x3_kernel" in kernel:
        return csrc_constant("peg_kernels.cuh", "kConvThreads")
    if "peg_weight_grad_kernel" in kernel:
        return csrc_constant("peg_kernels.cuh", "kGradChannels") * csrc_constant("peg_kernels.cuh", "kGradLanes")
    if "device_code_probe_kernel" in kernel:  # never launched: csrc/device_code.cu reads its attributes
        return 1
    raise AssertionError(f"no launch size known for {kernel}: add its block size to launch_threads")


@pytest.fixture(scope="module")
def kernels():
    """[(arch, mangled name, registers, static shared bytes)] of every kernel in the extension."""
    lines = extension_cuobjdump("-res-usage").splitlines()
    found, arch = [], None
    for line, following in zip(lines, lines[1:]):
        if match := re.match(r"arch = sm_(\d+)", line):
            arch = int(match.group(1))
        if match := re.match(r"\s*Function (\S+):", line):
            usage = re.search(r"REG:(\d+) .*SHARED:(\d+)", following)
            found.append((arch, match.group(1), int(usage.group(1)), int(usage.group(2))))
    assert found, "no kernels in cuobjdump's report of the extension"
    return found


def test_every_kernel_fits_its_launch(kernels):
    too_big = []
    for arch, kernel, registers, shared in kernels:
        warps = -(-launch_threads(kernel) // WARP)
        per_warp = -(-registers * WARP // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        if warps * per_warp > REGISTERS_PER_BLOCK or shared > STATIC_SHARED_LIMIT:
            too_big.append(f"sm_{arch} {kernel}: {warps} warps x {registers} registers, {shared} B shared")
    assert not too_big, "\n".join(too_big)


def test_every_kernel_is_built_for_each_architecture(kernels):
    archs = {arch for arch, *_ in kernels}
    names = {arch: {kernel for a, kernel, *_ in kernels if a == arch} for arch in archs}
    assert len({frozenset(kernel_names) for kernel_names in names.values()}) == 1, names
    assert len(names[min(archs)]) >= 10  # peg conv/grad, and LSA and GSA forward, dq, dk/dv
