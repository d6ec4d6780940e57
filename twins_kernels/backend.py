"""Which kernel backends exist on this machine, and which one a call runs on.

Backends:
  ``triton``  the Triton kernels (the default for CUDA tensors). With ``TRITON_INTERPRET=1`` set
              before ``twins_kernels`` is imported they also run on CPU tensors (how CI checks them).
  ``cuda``    the CUDA C++ extension ``twins_kernels._C`` built by ``setup.py`` from ``csrc/``.
  ``torch``   the PyTorch reference: runs anywhere, the ground truth for parity.

Selection order, first that is set wins: the ``backend=`` argument of a call or module, the
innermost ``use_backend(...)`` context, ``set_backend(...)``, the ``TWINS_KERNELS_BACKEND``
environment variable, then ``auto``. ``auto`` picks triton, then cuda, then torch for CUDA tensors,
and the reference for CPU tensors (the interpreter is for checking kernels, not for speed).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cuda", "torch")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "TWINS_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when it is


def triton_interpret_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter: Triton's own reading of TRITON_INTERPRET (1, true,
    on, ...), so that this package and Triton never disagree; False without Triton."""
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_extension_error() -> str | None:
    try:
        importlib.import_module("twins_kernels._C")
    except Exception as exc:
        return (
            "the CUDA extension twins_kernels._C is not built or cannot be loaded "
            f"({type(exc).__name__}: {exc}); reinstall with a CUDA toolkit: "
            "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation ."
        )
    return None


def cuda_extension_built() -> bool:
    return _cuda_extension_error() is None


@functools.lru_cache(maxsize=None)
def _cuda_device_code(index: int) -> tuple[int, str | None]:
    """(the compute capability x 10 the extension's code for GPU ``index`` was compiled for, or 0; why
    it cannot run there, or None): no such GPU, no binary or PTX of its TORCH_CUDA_ARCH_LIST that runs
    there (a GPU newer than the build, say: every launch would fail with "no kernel image"), or PTX the
    driver cannot JIT-compile (newer than the driver)."""
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        return 0, f"there is no GPU cuda:{index} ({count} visible)"
    name = torch.cuda.get_device_name(index)
    try:
        version = torch.ops.twins_kernels_cuda.device_code_version(index)
    except RuntimeError as exc:
        return 0, f"the CUDA extension twins_kernels._C cannot load its code on cuda:{index} ({name}): {exc}"
    if version > 0:
        return version, None
    major, minor = torch.cuda.get_device_capability(index)
    return 0, (
        f"the CUDA extension twins_kernels._C has no code for cuda:{index} ({name}, compute capability "
        f"{major}.{minor}); rebuild it for this GPU, with a CUDA toolkit that knows it: "
        f'TORCH_CUDA_ARCH_LIST="8.0;9.0;{major}.{minor}" CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .'
    )


def backend_status(name: str, device: torch.device | str | None = None) -> BackendStatus:
    """Whether ``name`` can run on tensors of ``device`` (default: a CUDA device if present). For ``cuda``
    on a GPU this asks the driver which of the extension's code that GPU runs, which starts CUDA there."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {CHOICES}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name == "torch":
        return BackendStatus(name, True, f"PyTorch reference on {device.type}")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(name, False, err)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(name, False, "no CUDA GPU is visible to PyTorch")
            return BackendStatus(name, True, "Triton kernels on the GPU")
        if device.type == "cpu" and triton_interpret_enabled():
            return BackendStatus(name, True, "Triton kernels in the interpreter (TRITON_INTERPRET=1)")
        return BackendStatus(
            name, False,
            f"Triton kernels need CUDA tensors (got {device.type}), or TRITON_INTERPRET=1 set "
            "before importing twins_kernels to run them on CPU tensors",
        )
    # cuda
    err = _cuda_extension_error()
    if err:
        return BackendStatus(name, False, err)
    if device.type != "cuda":
        return BackendStatus(name, False, f"the CUDA extension needs CUDA tensors (got {device.type})")
    if not torch.cuda.is_available():
        return BackendStatus(name, False, "no CUDA GPU is visible to PyTorch")
    version, err = _cuda_device_code(torch.cuda.current_device() if device.index is None else device.index)
    if err:
        return BackendStatus(name, False, err)
    # csrc/attention_launch.cuh: the tensor-core kernels need code compiled for 8.0+
    attention = "fp16/bf16 attention on tensor cores" if version >= 80 else "no tensor cores"
    return BackendStatus(name, True, f"CUDA C++ kernels on the GPU (code for compute capability "
                                     f"{version // 10}.{version % 10}: {attention})")


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    return {name: backend_status(name, device) for name in BACKENDS}


def check_backend_choice(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {CHOICES}")
    return name.lower()


_global_backend: str | None = None
# Per thread, not a context variable (which would keep asyncio tasks apart too): torch.compile traces
# get_backend and guards on its result, and torch 2.11's dynamo cannot trace ContextVar.get.
_context = threading.local()


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` clears it, falling back to the environment)."""
    global _global_backend
    _global_backend = check_backend_choice(name, "set_backend")


def get_backend() -> str:
    """The backend a call with no explicit choice would ask for (may be ``auto``)."""
    stack = getattr(_context, "stack", None)
    if stack:
        return stack[-1]
    if _global_backend is not None:
        return _global_backend
    return check_backend_choice(os.environ.get(ENV_VAR) or "auto", f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the calls inside the ``with`` block on ``name`` unless a call names its own backend
    (``None``: no change, the choice outside the block applies). The choice belongs to the thread that
    entered the block: asyncio tasks or generators interleaving their blocks on one thread see the
    innermost block entered there."""
    name = check_backend_choice(name, "use_backend")
    if name is None:
        yield
        return
    stack = getattr(_context, "stack", None)
    if stack is None:
        stack = _context.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Turn a request (or the ambient choice) into a concrete backend that can run on ``device``."""
    name = check_backend_choice(requested, "backend") or get_backend()
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in ("triton", "cuda"):
            if backend_status(candidate, device).available:
                return candidate
        return "torch"
    status = backend_status(name, device)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available for {device.type} tensors: {status.reason}")
    return name
