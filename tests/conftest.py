"""Test configuration: the Triton interpreter on CPU-only machines, devices, dtypes and markers.

TRITON_INTERPRET must be set before Triton kernels are defined, so it happens here, at import time,
before any test imports twins_kernels. On a machine with a GPU the kernels run natively.
"""
import contextlib
import gc
import importlib.util
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist's workers share the machine's cores: each takes its share for PyTorch's CPU ops, which
# otherwise take them all in every worker (two workers on two cores: test_mmseg.py 23% slower)
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
HAS_GPU = torch.cuda.is_available()
GPU_REASON = "needs a CUDA GPU (none visible to PyTorch)"
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason=GPU_REASON)
# Bitwise reproducibility of the Triton kernels: it can fail only where programs run concurrently (the
# interpreter runs them in turn); on a CPU, test_triton_aot.py's test_no_kernel_uses_atomics checks the kernels.
requires_concurrent_programs = pytest.mark.skipif(
    not HAS_GPU, reason="programs run concurrently on a GPU only (on a CPU: test_no_kernel_uses_atomics)")


def shared_tmp_dir(tmp_path_factory) -> pathlib.Path:
    """A directory of this pytest run that every pytest-xdist worker of the run sees: a worker's own is
    <the run's>/popen-<worker>. (A pytest started inside a worker inherits PYTEST_XDIST_WORKER, hence
    the name check: the parent of its own directory is no run's.)"""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return base.parent if worker and base.name == f"popen-{worker}" else base


@contextlib.contextmanager
def held_across_workers(tmp_path_factory, name: str):
    """An exclusive lock ``name`` among this run's pytest-xdist workers, held for the with-block.
    A lock rather than `--dist loadgroup`'s xdist_group mark: with pytest 9.2 the mark is silently
    ignored (pytest-dev/pytest-xdist#1386), and the tests it groups run on every worker at once."""
    import fcntl  # POSIX only, hence imported here

    with open(shared_tmp_dir(tmp_path_factory) / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture
def one_large_gpu_test_at_a_time(tmp_path_factory):
    """Tests that hold an estimated 20-25 GB of GPU memory (tensors past 2^31 elements and their fp32
    references) run one after another: three at once on 8 workers would not fit an 80 GB GPU. The
    memory a test cached goes back before the next worker's test takes the lock, a failed test's too:
    pytest keeps its traceback, and with it the test's tensors, in sys.last_traceback."""
    with held_across_workers(tmp_path_factory, "large_gpu_memory"):
        yield
        sys.last_type = sys.last_value = sys.last_traceback = None
        if sys.version_info >= (3, 12):
            sys.last_exc = None
        gc.collect()
        torch.cuda.empty_cache()


large_gpu_memory = pytest.mark.usefixtures("one_large_gpu_test_at_a_time")

# The device the kernels are checked on: the GPU when there is one, else the CPU via the interpreter.
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"

# bf16 runs through the interpreter too: twins_kernels.ops.interpreter_bf16 makes it compute bf16 by value.
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Twins-SVT-S with two blocks a stage (LSA, then GSA; the PEG after the first): every op in every stage,
# at a fraction of the interpreter time of its (2, 2, 10, 4) blocks
SHALLOW = (2, 2, 2, 2)


# A GPU session gives the suite a few minutes (benchmarks/run_gpu.sh) and may cut it there: on a GPU the
# op parity files run first, then the patched models, then the rest, each file's tests in their order.
GPU_FIRST_FILES = ("test_peg.py", "test_lsa.py", "test_gsa.py", "test_backend.py", "test_patch.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def gpu_first_order(items) -> list:
    rank = {name: i for i, name in enumerate(GPU_FIRST_FILES)}
    return sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        items[:] = gpu_first_order(items)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 means IEEE fp32 in every test, PyTorch's own convolutions included (cuDNN's default is
    TF32 on the GPU): see twins_kernels.testing.ieee_fp32."""
    from twins_kernels.testing import ieee_fp32

    with ieee_fp32():
        yield


@pytest.fixture(autouse=True)
def _release_cached_gpu_memory():
    """Give the GPU memory a test cached back after it: the suite runs in several processes sharing one
    GPU, and memory one process's allocator keeps is memory the others cannot have."""
    yield
    if HAS_GPU:
        torch.cuda.empty_cache()


@pytest.fixture
def deterministic_torch_convs(monkeypatch):
    """Bitwise-reproducible PyTorch convolutions around the fused ops (timm's patch embeddings, the cuda
    backend's GSA sub-sampling conv), since the bitwise-reproducibility tests are about the fused ops:
    on the GPU, cuDNN's deterministic algorithms (it may otherwise pick a weight gradient with atomics);
    on the CPU, one thread (the input gradient of a Conv2d(256, 512, 2, stride 2) on two threads differed
    from run to run in 6 of 50 runs here, with or without oneDNN, deterministic algorithms or not; on
    one thread in none of 100)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Another value draws other inputs for every case (a soak for inputs near a tolerance: the GPU's
# generator draws other values than the CPU's from the same seed); 0, the default, is CI's draw.
SEED_SALT = int(os.environ.get("TWINS_KERNELS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per case, reproducible from the test id (and TWINS_KERNELS_TEST_SEED)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode(), SEED_SALT))
    yield


def cuda_backend_reason():
    """Why the cuda backend cannot run here, or None when it can."""
    from twins_kernels.backend import backend_status

    status = backend_status("cuda", "cuda" if HAS_GPU else "cpu")
    return None if status.available else status.reason


def skip_unless_available(backend: str, device: str = "cuda"):
    """Skip the calling test, with the reason, unless ``backend`` can run on ``device``'s tensors here."""
    from twins_kernels.backend import backend_status

    status = backend_status(backend, device)
    if not status.available:
        pytest.skip(status.reason)


def skip_cuda_unless_available(backend: str):
    """For the cuda backend: skip the calling test, with the reason, unless it can run on KERNEL_DEVICE's
    tensors (without a GPU: emulated, see _cuda_backend_on_the_cpu). Other backends run (triton on the CPU
    through the interpreter)."""
    if backend == "cuda":
        skip_unless_available(backend, KERNEL_DEVICE)


def emulation_compiler(fibers: bool = True) -> str:
    """g++, to build code under tests/cuda_emulation/emulate.h; skips the calling test where there is none, or,
    for a build whose blocks' threads are fibers (all but the sanitized builds), on a machine other than x86-64,
    the only one emulate.h switches fibers on."""
    path = shutil.which("g++")
    if path is None:
        pytest.skip("needs g++ (C++20) to build the emulated kernels")
    if fibers and platform.machine() != "x86_64":
        pytest.skip(f"emulate.h switches its fibers in x86-64 code, and this machine is {platform.machine()}")
    return path


@pytest.fixture(scope="session")
def emulated_cuda_ops(tmp_path_factory):
    """torch.ops.twins_kernels_emulated (cuda_host_emulation.py): built once a pytest run, by the first
    pytest-xdist worker that needs it, and loaded in each."""
    from cuda_host_emulation import build_library

    compiler = emulation_compiler()
    library = shared_tmp_dir(tmp_path_factory) / "host_emulation.so"
    with held_across_workers(tmp_path_factory, library.name):
        if not library.exists():
            partial = library.with_suffix(".partial")  # a failed build leaves no library for the next worker
            build_library(compiler, tmp_path_factory.mktemp("emulated_csrc"), partial)
            partial.rename(library)
    torch.ops.load_library(str(library))
    return torch.ops.twins_kernels_emulated


@pytest.fixture
def emulated_cuda_backend(emulated_cuda_ops, monkeypatch):
    """The package's cuda backend on CPU tensors: csrc/'s host code, its kernels emulated."""
    from cuda_host_emulation import use_emulated_cuda_backend

    use_emulated_cuda_backend(monkeypatch, emulated_cuda_ops)


@pytest.fixture(autouse=True)
def _cuda_backend_on_the_cpu(request):
    """Without a GPU, a test parametrized with backend "cuda" runs it on CPU tensors, emulated: its
    skip_cuda_unless_available then finds it available."""
    callspec = getattr(request.node, "callspec", None)
    if not HAS_GPU and callspec is not None and callspec.params.get("backend") == "cuda":
        request.getfixturevalue("emulated_cuda_backend")


def require_cuda_extension():
    """Skip the calling test unless the CUDA extension is built; fail instead under
    TWINS_KERNELS_REQUIRE_EXTENSION=1 (`make test` sets it where a toolkit is found), so that a broken
    build fails rather than skips."""
    import twins_kernels
    from twins_kernels.backend import backend_status

    if not twins_kernels.cuda_extension_built():
        if os.environ.get("TWINS_KERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(backend_status("cuda", "cuda").reason)
        pytest.skip("the CUDA extension is not built here")


# Small fused modules on 32 channels, by kind: (twins_kernels, backend) -> module
SMALL_FUSED = {
    "peg": lambda tk, backend: tk.FusedPEG(32, 32, backend=backend),
    "lsa": lambda tk, backend: tk.FusedLSA(32, num_heads=2, ws=7, backend=backend),
    "gsa-sr4": lambda tk, backend: tk.FusedGSA(32, num_heads=2, sr_ratio=4, backend=backend),
    "gsa-sr1": lambda tk, backend: tk.FusedGSA(32, num_heads=2, sr_ratio=1, backend=backend),
}
SMALL_FUSED_KINDS = list(SMALL_FUSED)


def extension_cuobjdump(*args: str) -> str:
    """cuobjdump's output on the built CUDA extension (cuobjdump from Triton's NVIDIA backend)."""
    require_cuda_extension()
    pytest.importorskip("triton.backends.nvidia", reason="needs cuobjdump (from Triton's NVIDIA backend)")
    from triton import knobs

    library = importlib.util.find_spec("twins_kernels._C").origin
    return subprocess.run([knobs.nvidia.cuobjdump.path, *args, library], capture_output=True, text=True,
                          check=True).stdout


def small_fused_module(kind: str, backend: str | None):
    """A small fused module of ``kind`` (a SMALL_FUSED key) on ``backend``, on KERNEL_DEVICE."""
    import twins_kernels

    return SMALL_FUSED[kind](twins_kernels, backend).to(KERNEL_DEVICE)


def load_benchmarks_module(filename: str):
    """A module of benchmarks/ (plain files, not a package: pytest imports them by path), by file name."""
    path = os.path.join(ROOT, "benchmarks", filename)
    spec = importlib.util.spec_from_file_location(f"benchmarks_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look a class's module up
    spec.loader.exec_module(module)
    return module


def readme_python_block(containing: str) -> str:
    """The README's one ```python block that contains ``containing``: tests run the README's examples."""
    with open(f"{ROOT}/README.md") as readme:
        blocks = re.findall(r"```python\n(.*?)```", readme.read(), re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} python blocks of the README contain {containing!r}"
    return found[0]
