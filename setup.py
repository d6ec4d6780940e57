"""Build twins_kernels; with a CUDA toolkit, also the CUDA C++ extension twins_kernels._C from csrc/.

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .   # with the extension
    TWINS_KERNELS_BUILD_CUDA=0 pip install .                       # pure Python (Triton + reference)

--no-build-isolation lets the build see the torch you installed (the extension must be built against
it). TORCH_CUDA_ARCH_LIST is honoured; the default (8.0;9.0+PTX) has binaries for A100 and H100, and
PTX that newer GPUs JIT-compile.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


# pip runs this file once per build hook (metadata, then the wheel): only the build says what it does
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def say(message):
    if BUILD_COMMANDS & set(sys.argv[1:]):
        print(f"twins_kernels setup: {message}", file=sys.stderr)


def cuda_extension():
    """The CUDAExtension and build class, or ([], {}) with one clear message saying why not."""
    if os.environ.get("TWINS_KERNELS_BUILD_CUDA", "auto").lower() in ("0", "false", "no", "off"):
        say("TWINS_KERNELS_BUILD_CUDA=0: installing the pure-Python package (no CUDA extension).")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        say("torch is not importable in this build environment: installing the pure-Python package. "
            "To build the CUDA extension, install torch first, then: pip install --no-build-isolation .")
        return [], {}
    if torch.version.cuda is None:  # its CUDA libraries are what the extension links against
        say(f"torch {torch.__version__} is a CPU-only build: installing the pure-Python package without the "
            f"CUDA extension (install a CUDA build of torch to build it).")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        say("no CUDA toolkit found (set CUDA_HOME): installing the pure-Python package without the CUDA extension.")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    say(f"building the CUDA extension with {nvcc} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    # headers such as cusparse.h ship in the nvidia pip wheels when the toolkit is partial
    include_dirs = [os.path.join(ROOT, "csrc")]
    include_dirs += [d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "cu*", "include"))]
    extension = CUDAExtension(
        name="twins_kernels._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu"))),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="twins_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for the Twins vision transformers (LSA, GSA, PEG)",
    packages=find_packages(include=["twins_kernels", "twins_kernels.*"]),
    # the oldest versions CI tests (make gpu-versions); torch 2.11 needs Python 3.10
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["timm>=1.0.3", "pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
        "bench": ["timm>=1.0.3", "pytest", "pytest-benchmark", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
