"""The CUDA extension's host code on CPU tensors: csrc/'s ops built with g++ as torch.ops.twins_kernels_emulated,
CPU ops whose launches run the kernels under cuda_emulation/emulate.h (cuda_emulation/host_emulation.cpp says
how), and the package's `cuda` backend on CPU tensors running them (conftest.py's emulated_cuda_backend).

Without a GPU, a test parametrized with backend "cuda" runs that way (conftest.py), so the cuda backend's
tests check csrc/'s host code (argument checks, outputs, dtype dispatch, the kernels' geometry from the tensors'
sizes and strides, launch configurations, the reductions after the kernels) and its kernels on every machine.
They run in the test's process: a fault the emulation stops at, or a stray access, ends it, as it would end the
CUDA context on a GPU (pytest-xdist reports the test as crashed); test_cuda_emulation.py runs the kernels in
harness processes of their own, under sanitizers too.
"""
import importlib
import os
import re
import subprocess
import sysconfig

import pytest
import torch

from conftest import ROOT
from parity import DTYPE_IDS

EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")

# kernel<<<config>>>(args), the launch syntax g++ cannot read; the kernel may be a template's instance
LAUNCH = re.compile(r"([\w:]+(?:<[\w:, ]*>)?)<<<(.*?)>>>\(")
# The ops registered for CPU tensors, under a namespace of their own: each edit applies once
REGISTRATION = {
    "TORCH_LIBRARY(twins_kernels_cuda,": "TORCH_LIBRARY(twins_kernels_emulated,",
    "TORCH_LIBRARY_IMPL(twins_kernels_cuda, CUDA,": "TORCH_LIBRARY_IMPL(twins_kernels_emulated, CPU,",
}
# the device's code version as the extension reads it (host_emulation.cpp): 90 runs fp16 and bf16 on the
# tensor-core kernels, 75 (code for a GPU before them) on the scalar ones, fp32's only kernels
DEVICE_CODE = {"mma": "90", "scalar": "75"}
# the attention kernels the extension runs per dtype: scalar for every dtype (fp32's only path), mma for
# fp16/bf16 where the extension's code for the GPU was compiled for compute capability 8.0+
KERNELS_AND_DTYPES = pytest.mark.parametrize("kernels,dtype", [
    pytest.param(kernels, dtype, id=f"{kernels}-{DTYPE_IDS[dtype]}")
    for kernels, dtype in [("scalar", torch.float32), ("scalar", torch.float16), ("scalar", torch.bfloat16),
                           ("mma", torch.float16), ("mma", torch.bfloat16)]])


def write_emulated_csrc(folder):
    """csrc/ copied into ``folder`` with each launch written emulated_chevron(kernel, config)(args), each
    is_cuda() check is_cpu() (CPU tensors stand in for the GPU's), and the ops registered as
    twins_kernels_emulated for CPU tensors."""
    launches = checks = 0
    registrations = dict.fromkeys(REGISTRATION, 0)
    for name in os.listdir(os.path.join(ROOT, "csrc")):
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text = f.read()
        text, count = LAUNCH.subn(r"emulated_chevron(\1, \2)(", text)
        launches += count
        checks += text.count(".is_cuda()")
        text = text.replace(".is_cuda()", ".is_cpu()")
        for old, new in REGISTRATION.items():
            registrations[old] += text.count(old)
            text = text.replace(old, new)
        assert "<<<" not in text, f"csrc/{name}: a launch that {LAUNCH.pattern} does not read"
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    assert launches >= 6 and checks >= 3 and all(n == 1 for n in registrations.values()), (
        launches, checks, registrations)


def build_library(compiler: str, folder, library):
    """host_emulation.cpp built with ``compiler`` (g++) into ``library``, from a copy of csrc/ in ``folder``
    (about 30 s)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    write_emulated_csrc(folder)
    # host/ first: its CUDA runtime and c10 CUDA headers stand in for the real ones
    folders = [os.path.join(EMULATION, "host"), folder, EMULATION, *include_paths(), sysconfig.get_paths()["include"]]
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                    *(flag for path in folders for flag in ("-I", str(path))),
                    os.path.join(EMULATION, "host_emulation.cpp"), "-o", str(library),
                    *(f"-L{path}" for path in library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"], check=True)


def use_emulated_cuda_backend(monkeypatch, ops):
    """The package's cuda backend runs on CPU tensors, its ops ``ops`` (torch.ops.twins_kernels_emulated)."""
    from twins_kernels import backend
    from twins_kernels.ops import common

    real_status = backend.backend_status

    def status(name, device=None):
        if name == "cuda" and device is not None and torch.device(device).type == "cpu":
            return backend.BackendStatus(name, True, "the CUDA extension's host code on the CPU, its kernels emulated")
        return real_status(name, device)

    def cuda_ops():
        ops.set_poison_outputs(common._poison_outputs)
        return ops

    monkeypatch.setattr(backend, "backend_status", status)
    for op in ("lsa", "gsa", "peg"):
        monkeypatch.setattr(importlib.import_module(f"twins_kernels.ops.{op}"), "cuda_ops", cuda_ops)
