"""``python -m twins_kernels bench``: whole-model parity and throughput of a patched timm Twins model.

    python -m twins_kernels bench --model twins_svt_small --size 224 --batch 256 --dtype bf16

Patches a copy of the timm model, checks that its logits are as close to a higher-precision run as
the unpatched model's (``testing.model_error_allowed``), then (on a GPU) prints images/s for timm
eager, patched eager, and both under torch.compile. Without a GPU it says what it cannot measure and
runs the parity part on the CPU (small batch; the Triton kernels in the interpreter when
TRITON_INTERPRET=1, bf16 included).
"""
from __future__ import annotations

import copy
import time

import torch

from .backend import CHOICES, BackendUnavailableError, get_backend, resolve_backend, triton_interpret_enabled
from .patch import patch_model
from .testing import ieee_fp32, model_error_allowed, rel_err

DESCRIPTION = ("Patches a timm Twins model, checks its logits against a higher-precision run (as close as the "
               "unpatched model's), then on a GPU prints images/s of timm and the patched model, eager and under "
               "torch.compile. Without a GPU it runs the parity check on the CPU.")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_PARITY_BATCH = 2


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="twins_svt_small", help="a timm twins_* model name")
    parser.add_argument("--size", type=int, default=224, help="input image side")
    parser.add_argument("--batch", type=int, default=256,
                        help=f"images a batch (on the CPU: at most {CPU_PARITY_BATCH})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the model's dtype")
    parser.add_argument("--backend", default=None, choices=CHOICES, help="the fused ops' backend (None: the ambient "
                        "choice, set_backend or TWINS_KERNELS_BACKEND, else auto)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")


def _progress(iterable, desc: str, total: int):
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    except ImportError:
        print(f"  {desc} ...", flush=True)
        return iterable


def median_cuda_ms(fn, iters: int, desc: str | None = None) -> float:
    """The median of ``iters`` timings of ``fn()`` in milliseconds, each between CUDA events, after three
    warm-up calls (compilation, autotuning, cuDNN heuristics); with ``desc``, a progress bar."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters) if desc is None else _progress(range(iters), desc, iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def images_per_second(model, x, iters: int, desc: str) -> float:
    return x.shape[0] / (median_cuda_ms(lambda: model(x), iters, desc) * 1e-3)


def run(args) -> int:
    import timm

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype]
    batch = args.batch if on_gpu else min(args.batch, CPU_PARITY_BATCH)
    if not on_gpu:
        print(f"no CUDA GPU: throughput cannot be measured here; running the parity check on the CPU "
              f"at batch {batch} (the timings need a GPU)")
    backend = args.backend
    if backend is None and get_backend() == "auto" and not on_gpu and triton_interpret_enabled():
        backend = "triton"  # auto would pick the reference for CPU tensors: check the kernels instead
    try:
        resolve_backend(backend, torch.device(device))
    except BackendUnavailableError as exc:
        print(f"cannot run the patched model: {exc}")
        return 2
    model = timm.create_model(args.model, pretrained=False).eval().to(device, dtype)
    patched = copy.deepcopy(model)
    report = patch_model(patched, backend=backend)
    print(f"{args.model} {args.size}x{args.size} batch {batch} {str(dtype).replace('torch.', '')} on {device}")
    print(report)

    x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
    started = time.perf_counter()
    # Both models against one in higher precision with the same (rounded) weights: patched and timm in
    # bf16 are each about 1e-2 from it, so comparing them with each other would say little.
    reference_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    # In IEEE fp32 (cuDNN's fp32 convs default to TF32 on the GPU): the timings below keep the user's settings.
    reference = copy.deepcopy(model).to(reference_dtype)
    with torch.no_grad(), ieee_fp32():
        expected = reference(x.to(reference_dtype))
        del reference
        err = rel_err(patched(x), expected)
        timm_err = rel_err(model(x), expected)
    allowed = model_error_allowed(dtype, timm_err)
    ok = err <= allowed
    print(f"parity: logits relative error against {str(reference_dtype).replace('torch.', '')}: patched "
          f"{err:.2e}, timm {timm_err:.2e} (allowed {allowed:.1e}): {'ok' if ok else 'FAIL'} "
          f"({time.perf_counter() - started:.1f} s)")
    if not on_gpu:
        return 0 if ok else 1

    variants = {"timm eager": model, "patched eager": patched}
    if not args.no_compile:
        variants["timm + compile"] = torch.compile(model)
        variants["patched + compile"] = torch.compile(patched)
    print(throughput_table({name: images_per_second(m, x, args.iters, name) for name, m in variants.items()}))
    return 0 if ok else 1


def throughput_table(images_per_s: dict[str, float]) -> str:
    """Each variant's images/s and its speedup over timm eager's."""
    base = images_per_s["timm eager"]
    lines = [f"{'variant':<18} {'images/s':>10} {'vs timm eager':>14}"]
    lines += [f"{name:<18} {ips:>10.1f} {ips / base:>13.2f}x" for name, ips in images_per_s.items()]
    return "\n".join(lines)
