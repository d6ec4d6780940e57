"""Backend selection, the CUDA extension's registration, and imports without a GPU."""
import concurrent.futures
import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import twins_kernels
import twins_kernels.backend as backend_module
from twins_kernels.backend import BackendUnavailableError, backend_status, get_backend, resolve_backend

from conftest import (HAS_GPU, KERNEL_DEVICE, ROOT, SMALL_FUSED_KINDS, extension_cuobjdump,
                      require_cuda_extension, skip_unless_available, small_fused_module)


def test_selection_order_argument_context_global_env(monkeypatch):
    monkeypatch.setenv("TWINS_KERNELS_BACKEND", "triton")
    twins_kernels.set_backend(None)
    assert get_backend() == "triton"
    twins_kernels.set_backend("torch")
    try:
        assert get_backend() == "torch"
        with twins_kernels.use_backend("auto"):
            assert get_backend() == "auto"
            with twins_kernels.use_backend("cuda"):
                assert get_backend() == "cuda"
                # a call's own argument beats every context (cuda could not run CPU tensors)
                assert resolve_backend("torch", torch.device("cpu")) == "torch"
            assert get_backend() == "auto"
            with twins_kernels.use_backend(None):  # no override: the choice outside the block
                assert get_backend() == "auto"
            with pytest.raises(RuntimeError, match="inside"), twins_kernels.use_backend("cuda"):
                raise RuntimeError("inside")
            assert get_backend() == "auto", "a block left by an exception must end its choice"
    finally:
        twins_kernels.set_backend(None)


def test_outside_the_kernels_auto_runs_the_reference_and_a_named_kernel_backend_raises():
    """The rule for calls the kernels do not support (a head_dim, a window): ``auto``, asked for by the
    call or the ambient choice, gives the reference; a kernel backend, named either way, raises. On a
    GPU the ops' tests run it (on CPU tensors ``auto`` is the reference before the rule is asked)."""
    from twins_kernels.ops.common import reference_outside_kernels

    outside = "head_dim = C / num_heads = 32 / 4 = 8 is outside 16..128"
    with twins_kernels.use_backend("auto"):
        assert reference_outside_kernels(None, "triton", outside) == "torch"
        with pytest.raises(ValueError, match=f"{re.escape(outside)}, which the cuda kernels support"):
            reference_outside_kernels("cuda", "cuda", outside)
    with twins_kernels.use_backend("triton"):
        assert reference_outside_kernels("auto", "triton", outside) == "torch"
        with pytest.raises(ValueError, match="which the triton kernels support; use backend='torch'"):
            reference_outside_kernels(None, "triton", outside)


@pytest.mark.parametrize("available,expected", [
    (("triton", "cuda"), "triton"), (("cuda",), "cuda"), ((), "torch"),
], ids=["both", "cuda-only", "neither"])
def test_auto_on_cuda_tensors_prefers_triton_then_cuda_then_the_reference(monkeypatch, available, expected):
    def status(name, device=None):
        return backend_module.BackendStatus(name, name in available, "" if name in available else "stubbed out")
    monkeypatch.setattr(backend_module, "backend_status", status)
    assert resolve_backend("auto", torch.device("cuda")) == expected


def test_auto_runs_cpu_tensors_on_the_reference():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("TWINS_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="TWINS_KERNELS_BACKEND.*fastest"):
        get_backend()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="cudnn"):
        twins_kernels.set_backend("cudnn")


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only behaviour")
def test_cuda_backend_on_cpu_names_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    assert backend_status("triton", "cuda").reason == "no CUDA GPU is visible to PyTorch"


def test_cuda_extension_registers_its_ops():
    """`make test` builds the extension (it compiles and links here even without a GPU), and sets
    TWINS_KERNELS_REQUIRE_EXTENSION=1 so that a broken build fails instead of skipping."""
    require_cuda_extension()
    names = ["peg_conv3x3", "peg_weight_grad", "lsa_forward", "lsa_backward",
             "gsa_attention_forward", "gsa_attention_backward", "device_code_version", "set_poison_outputs"]
    schemas = {str(getattr(torch.ops.twins_kernels_cuda, name).default._schema).split("(")[0] for name in names}
    assert schemas == {f"twins_kernels_cuda::{name}" for name in names}


def unloadable(index):
    raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain.")


@pytest.mark.parametrize("device,code_version,available,reason", [
    ("cuda", lambda index: 80, True, r"\(code for compute capability 8\.0: fp16/bf16 attention on tensor cores\)$"),
    ("cuda:1", lambda index: 75 if index == 1 else 0, True, r"\(code for compute capability 7\.5: no tensor cores\)$"),
    ("cuda", lambda index: 0, False, r"has no code for cuda:0 \(NVIDIA RTX PRO 6000, compute capability 12\.0\); "
                                     r"rebuild it for this GPU, with a CUDA toolkit that knows it: "
                                     r'TORCH_CUDA_ARCH_LIST="8\.0;9\.0;12\.0" '),
    ("cuda:1", unloadable, False, r"cannot load its code on cuda:1 \(NVIDIA RTX PRO 6000\): CUDA error: the "
                                  r"provided PTX was compiled with an unsupported toolchain"),
    ("cuda:2", lambda index: 80, False, r"there is no GPU cuda:2 \(2 visible\)"),
], ids=["sm80-code", "compute75-code-on-cuda:1", "no-code", "ptx-the-driver-cannot-load", "no-such-gpu"])
def test_cuda_backend_status_on_each_gpu(device, code_version, available, reason, monkeypatch):
    """The cuda backend is available on a GPU the extension has code for, saying for which compute
    capability (and so whether its attention runs on tensor cores); a GPU that no binary or PTX of its
    TORCH_CUDA_ARCH_LIST runs on (a GPU newer than the build), PTX the driver cannot load, or a GPU that
    does not exist make it unavailable, the message naming the GPU and the fix. Two GPUs (current:
    cuda:0) are stood in for here."""
    require_cuda_extension()
    from twins_kernels import backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA RTX PRO 6000")
    monkeypatch.setattr(torch.ops.twins_kernels_cuda, "device_code_version", code_version)
    backend._cuda_device_code.cache_clear()
    try:
        status = backend_status("cuda", device)
        assert status.available == available and re.search(reason, status.reason), status
        if available:
            assert resolve_backend("cuda", torch.device(device)) == "cuda"
        else:
            with pytest.raises(BackendUnavailableError, match=reason):
                resolve_backend("cuda", torch.device(device))
    finally:
        backend._cuda_device_code.cache_clear()


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_device_code_version_is_the_code_this_gpu_runs():
    """The compute capability the extension's code for this GPU was compiled for, as the driver chooses
    it from the build's binaries and PTX (cuobjdump's lists): the newest binary of the GPU's major
    version no newer than the GPU, else the newest PTX no newer than it (csrc/device_code.cu)."""
    binaries = {int(a) for a in re.findall(r"device_code\.sm_(\d+)\.cubin", extension_cuobjdump("--list-elf"))}
    ptx = {int(a) for a in re.findall(r"device_code\.sm_(\d+)\.ptx", extension_cuobjdump("--list-ptx"))}
    major, minor = torch.cuda.get_device_capability()
    gpu = 10 * major + minor
    runnable = [b for b in binaries if b // 10 == major and b <= gpu] or [p for p in ptx if p <= gpu]
    assert runnable, f"the build ({binaries} binaries, {ptx} PTX) has no code for compute capability {gpu}"
    assert torch.ops.twins_kernels_cuda.device_code_version(torch.cuda.current_device()) == max(runnable)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_attention_runs_the_kernel_family_of_its_dtype(dtype):
    """On code compiled for compute capability 8.0+ (every build for A100 and H100), fp16 and bf16 LSA and
    GSA run the tensor-core kernels, forward and backward, and fp32 the scalar ones (exact fp32 dots):
    the kernels' names in the profiler's trace. The backward's delta kernel (from out) does not run: the
    scalar dq kernel computes delta always, the tensor-core one where a query's keys are one of its tiles,
    as here (a 7 x 7 window; 12 sub-sampled keys)."""
    from torch.profiler import ProfilerActivity, profile

    from twins_kernels.ops import gsa_attention, lsa

    skip_unless_available("cuda")
    assert torch.ops.twins_kernels_cuda.device_code_version(torch.cuda.current_device()) >= 80
    qkv = torch.randn(2, 9 * 10, 3 * 64, device="cuda", dtype=dtype, requires_grad=True)
    q, kv = torch.randn(2, 90, 64, device="cuda", dtype=dtype), torch.randn(2, 12, 128, device="cuda", dtype=dtype)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        lsa(qkv, torch.zeros(3 * 64, device="cuda", dtype=dtype), (9, 10), 2, 7, backend="cuda").sum().backward()
        gsa_attention(q.requires_grad_(), kv.requires_grad_(), 2, backend="cuda").sum().backward()
        torch.cuda.synchronize()
    names = " ".join(event.name for event in trace.events())
    expected = {"scalar"} if dtype == torch.float32 else {"mma"}
    for step in ("forward", "dq", "dkdv"):
        for geometry in ("LsaGeometry", "GsaGeometry"):
            patterns = {"mma": rf"mma_attention_{step}_kernel<[^>]*{geometry}",
                        "scalar": rf"(?<!\w)attention_{step}_kernel<[^>]*{geometry}"}
            ran = {family for family, pattern in patterns.items() if re.search(pattern, names)}
            assert ran == expected, f"{step} on {geometry}: ran {ran or 'neither'}, expected {expected}; {names}"
    assert "attention_delta_kernel" not in names, names


def test_poisoned_outputs_reach_the_cuda_extension(monkeypatch):
    """The extension's outputs start as NaN under poisoned_outputs() too (csrc/outputs.h): cuda_ops()
    tells it when the setting changed since it last did, and only then."""
    require_cuda_extension()
    from twins_kernels.ops import common

    told = []
    real = torch.ops.twins_kernels_cuda.set_poison_outputs
    monkeypatch.setattr(common, "_cuda_poisons", False)
    monkeypatch.setattr(torch.ops.twins_kernels_cuda, "set_poison_outputs", lambda on: (told.append(on), real(on)))
    common.cuda_ops()
    with common.poisoned_outputs():
        common.cuda_ops()
        common.cuda_ops()
    common.cuda_ops()
    assert told == [True, False]


def test_import_never_needs_a_gpu_or_triton():
    """In a fresh interpreter where neither triton nor the CUDA extension can be imported (a machine with
    no toolkit), the package imports, every module and patch_model work on the reference, and the
    backend status says why each kernel backend is unavailable."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['twins_kernels._C'] = None\n"
        "import torch, timm, twins_kernels\n"
        "x = torch.randn(1, 6, 32)\n"
        "for m in (twins_kernels.FusedPEG(32, 32), twins_kernels.FusedLSA(32, 2, ws=2),\n"
        "          twins_kernels.FusedGSA(32, 2, sr_ratio=2), twins_kernels.FusedGSA(32, 2)):\n"
        "    assert m(x, (2, 3)).shape == (1, 6, 32)\n"
        "model = timm.create_model('twins_svt_small', pretrained=False).eval()\n"
        "report = twins_kernels.patch_model(model)\n"
        "assert report.replaced['lsa'] and report.replaced['gsa'] and report.replaced['peg'], report\n"
        "model(torch.randn(1, 3, 64, 64))\n"
        "s = twins_kernels.available_backends('cuda')['triton']\n"
        "assert not s.available and 'triton cannot be imported' in s.reason, s\n"
        "s = twins_kernels.available_backends('cuda')['cuda']\n"
        "assert not s.available and 'extension twins_kernels._C is not built' in s.reason, s\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_the_sdist_carries_every_extension_source(tmp_path):
    """An sdist (what `python -m build` builds its wheel from) with csrc/ whole, headers included, even made
    where there is no toolkit; a tracked file of csrc/ it left out would fail the extension's build there.
    Made from a copy of the tracked files, so that setup.py writes nothing into the checkout."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: no list of the tracked files")
    tree = tmp_path / "tree"
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tree / name)
    env = {**os.environ, "TWINS_KERNELS_BUILD_CUDA": "0"}
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        carried = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted(name for name in tracked if name.startswith("csrc/") and name not in carried)
    assert not missing, missing


NO_EXTENSION = "TWINS_KERNELS_BUILD_CUDA=0: installing the pure-Python package (no CUDA extension)"


@pytest.mark.parametrize("env,says", [
    ({"TWINS_KERNELS_BUILD_CUDA": "0"}, NO_EXTENSION), ({"TWINS_KERNELS_BUILD_CUDA": "Off"}, NO_EXTENSION),
    ({"CUDA_HOME": "/nonexistent"}, "no CUDA toolkit found (set CUDA_HOME)"),
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, "for TORCH_CUDA_ARCH_LIST=9.0\n"),
    ({}, "for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX\n"),
], ids=["off-0", "off-word", "no-toolkit", "arch-list-given", "arch-list-default"])
def test_setup_says_what_it_builds_and_for_which_gpus(env, says):
    """setup.py's decision and its one message (`build_ext --help` decides and builds nothing): the switch
    off, a toolkit that is not there, and the GPUs a build is for, TORCH_CUDA_ARCH_LIST's or the default."""
    from torch.utils.cpp_extension import CUDA_HOME

    if "TORCH_CUDA_ARCH_LIST" in says and not (torch.version.cuda and CUDA_HOME
                                               and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "TWINS_KERNELS_BUILD_CUDA")}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], cwd=ROOT, env={**base, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and says in result.stderr, result.stderr


def test_main_job_prints_the_environment_and_a_passing_table():
    result = subprocess.run([sys.executable, "-m", "twins_kernels"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "twins_kernels environment" in result.stdout and "all parity checks passed" in result.stdout
    assert "peg" in result.stdout and " ok" in result.stdout


def test_main_job_fails_when_any_row_fails(monkeypatch, capsys):
    """One row over its tolerance, the first of the table, makes the whole job fail."""
    import twins_kernels.__main__ as main_job

    calls = []

    def first_row_fails(*args, **kwargs):
        calls.append(None)
        return {"out": 1.0 if len(calls) == 1 else 0.0}

    monkeypatch.setattr(twins_kernels.testing, "module_parity_errors", first_row_fails)
    assert main_job.main(["--no-interpret"]) == 1
    output = capsys.readouterr().out
    assert len(re.findall(r"\bFAIL\b", output)) == 1 and len(calls) > 1 and "SOME PARITY CHECKS FAILED" in output


def test_main_job_speedup_is_timm_time_over_fused_time(monkeypatch):
    """The GPU table's timing columns, with a stand-in timer: timm 2 ms, fused 1 ms is a 2x speedup."""
    import twins_kernels.__main__ as main_job
    import twins_kernels.bench
    from timm.models.twins import PosConv

    timm_ran = []

    def make_timm():
        module = PosConv(8, 8)
        module.register_forward_hook(lambda *args: timm_ran.append(True))
        return module

    def stand_in_timer(fn, iters, desc=None):
        timm_ran.clear()
        fn()
        return 2.0 if timm_ran else 1.0

    monkeypatch.setattr(twins_kernels.bench, "median_cuda_ms", stand_in_timer)
    columns = main_job._timing_columns(make_timm, twins_kernels.FusedPEG, "torch", torch.randn(1, 12, 8), (3, 4))
    assert columns.split() == ["1.000", "2.000", "2.00x"]


def test_bench_mode_times_are_medians_and_speedups_are_over_timm_eager(monkeypatch):
    """With stand-in CUDA events: five timings 5, 1, 4, 2, 3 ms have the median 3; and the table's
    speedup is a variant's images/s over timm eager's."""
    import twins_kernels.bench as bench

    timings = iter([5.0, 1.0, 4.0, 2.0, 3.0])

    class StandInEvent:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(timings)

    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert bench.median_cuda_ms(lambda: None, 5) == 3.0
    table = bench.throughput_table({"timm eager": 100.0, "patched eager": 250.0}).splitlines()
    assert table[1].split() == ["timm", "eager", "100.0", "1.00x"]
    assert table[2].split() == ["patched", "eager", "250.0", "2.50x"]


def test_bench_mode_checks_parity_and_says_what_it_cannot_measure():
    result = subprocess.run([sys.executable, "-m", "twins_kernels", "bench", "--model", "twins_svt_small",
                             "--size", "64", "--batch", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity: logits relative error" in result.stdout
    assert "twins_svt_small 64x64 batch 1 " in result.stdout  # the batch asked for, on the CPU too
    if not HAS_GPU:
        assert "throughput cannot be measured here" in result.stdout
    else:
        assert "images/s" in result.stdout


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only behaviour")
def test_bench_mode_names_a_backend_that_cannot_run_here():
    result = subprocess.run([sys.executable, "-m", "twins_kernels", "--no-interpret", "bench", "--backend", "cuda"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot run the patched model: backend 'cuda' is not available for cpu tensors" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_main_job_reports_unavailable_backends_without_triton():
    code = "import sys, runpy; sys.modules['triton'] = None; sys.argv = ['twins_kernels', '--no-interpret']; " \
           "runpy.run_module('twins_kernels', run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert "backend triton  no   triton cannot be imported" in result.stdout, result.stdout + result.stderr
    assert "all parity checks passed" in result.stdout, result.stdout + result.stderr


# the torch backend's forwards and backwards, (op module, function) ("twins_kernels.ops.peg" and the rest:
# twins_kernels.ops's attributes of these names are the functions)
REFERENCE_FORWARDS = [("peg", "peg_reference"), ("lsa", "_reference_forward"),
                      ("gsa", "_attention_forward_reference"), ("gsa", "_subsample_forward_reference")]
REFERENCE_BACKWARDS = [("peg", "peg_reference_backward"), ("lsa", "_reference_backward"),
                       ("gsa", "_attention_backward_reference"), ("gsa", "_subsample_backward_reference")]


def make_raise(monkeypatch, references, message: str):
    """Each of ``references`` raises an AssertionError with ``message`` when called."""
    def raising(*args, **kwargs):
        raise AssertionError(message)

    for module, name in references:
        monkeypatch.setattr(importlib.import_module(f"twins_kernels.ops.{module}"), name, raising)


@pytest.mark.parametrize("kind", SMALL_FUSED_KINDS)
def test_backward_runs_on_the_backend_its_forward_ran_on(kind, monkeypatch):
    """Autograd runs a CUDA backward on its own device thread, where the forward thread's use_backend()
    context does not apply: the backward must run on the forward's backend, not on the ambient one
    there. Here the forward runs on triton inside use_backend("triton") and the backward on a thread
    whose ambient backend is torch (TWINS_KERNELS_BACKEND), whose reference backwards raise."""
    make_raise(monkeypatch, REFERENCE_BACKWARDS,
               "the backward ran on the ambient backend (the reference), not on the forward's")
    monkeypatch.setenv("TWINS_KERNELS_BACKEND", "torch")
    fused = small_fused_module(kind, backend=None)  # the ambient choice
    x = torch.randn(2, 9 * 10, 32, device=KERNEL_DEVICE, requires_grad=True)
    with twins_kernels.use_backend("triton"):
        out = fused(x, (9, 10))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: out.sum().backward()).result()
    assert x.grad is not None and all(p.grad is not None for p in fused.parameters())


@pytest.mark.parametrize("kind", SMALL_FUSED_KINDS)
def test_a_compiled_module_follows_a_later_set_backend_forward_and_backward(kind, monkeypatch):
    """The ambient choice is read as the graph is traced, and dynamo guards on it: after set_backend the
    compiled module runs its forward and its backward on the new choice (the backward had kept the one
    of the first trace while the forward took the new one)."""
    fused = small_fused_module(kind, backend=None)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9 * 10, 32, device=KERNEL_DEVICE, requires_grad=True)
    try:
        twins_kernels.set_backend("torch")
        compiled(x, (9, 10)).sum().backward()
        make_raise(monkeypatch, REFERENCE_FORWARDS + REFERENCE_BACKWARDS,
                   "ran on the reference, the choice of the first trace")
        twins_kernels.set_backend("triton")
        compiled(x, (9, 10)).sum().backward()
    finally:
        twins_kernels.set_backend(None)
