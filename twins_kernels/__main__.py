"""The main job: ``python -m twins_kernels`` (and ``python -m twins_kernels bench``, see bench.py).

Prints the environment (torch, triton, CUDA extension built?, GPU), then runs every op on every
backend available on this device against the real timm module in float64, forward and backward,
and prints a table: op, backend, dtype, worst relative error (output, input and parameter
gradients), pass/fail against the parity tolerances, and on a GPU the forward time next to timm's.

Without a GPU it re-runs itself with TRITON_INTERPRET=1 (unless --no-interpret), so the Triton
kernels are checked on the CPU too; the interpreter is slow, so CPU shapes are small.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

# per timing in the parity table; CUDA events, not triton.testing, which the cuda backend does not need
TIMED_CALLS = 50


def _reexec_with_interpreter(argv) -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET"):
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "twins_kernels", *argv], env)


def _op_cases(on_gpu: bool):
    """(op, shape label, timm module factory, fused class, (B, H, W, C)): Twins-SVT-S stage shapes on a
    GPU (224 input, batch 64), small maps that need padding (LSA) or flooring (GSA) on the CPU."""
    from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, PosConv

    from . import FusedGSA, FusedLSA, FusedPEG

    if on_gpu:
        return [
            ("peg", "svt_s s1 224 bs64", lambda: PosConv(64, 64), FusedPEG, (64, 56, 56, 64)),
            ("lsa", "svt_s s1 224 bs64", lambda: LocallyGroupedAttn(64, 2, ws=7), FusedLSA, (64, 56, 56, 64)),
            ("lsa", "svt_s s1 512 bs16", lambda: LocallyGroupedAttn(64, 2, ws=7), FusedLSA, (16, 128, 128, 64)),
            ("gsa", "svt_s s1 224 bs64", lambda: GlobalSubSampleAttn(64, 2, sr_ratio=8), FusedGSA, (64, 56, 56, 64)),
            ("gsa", "svt_s s4 224 bs64", lambda: GlobalSubSampleAttn(512, 16, sr_ratio=1), FusedGSA, (64, 7, 7, 512)),
        ]
    return [
        ("peg", "14x14 C64 bs2", lambda: PosConv(64, 64), FusedPEG, (2, 14, 14, 64)),
        ("lsa", "13x17 ws7 C64 bs2", lambda: LocallyGroupedAttn(64, 2, ws=7), FusedLSA, (2, 13, 17, 64)),
        ("gsa", "17x12 sr4 C64 bs2", lambda: GlobalSubSampleAttn(64, 2, sr_ratio=4), FusedGSA, (2, 17, 12, 64)),
        ("gsa", "9x9 sr1 C128 bs2", lambda: GlobalSubSampleAttn(128, 4, sr_ratio=1), FusedGSA, (2, 9, 9, 128)),
    ]


def print_environment() -> None:
    import torch

    from .backend import available_backends, cuda_extension_built

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print("twins_kernels environment")
    print(f"  python          {platform.python_version()}")
    print(f"  torch           {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  triton          {triton_version}")
    print(f"  CUDA extension  {'built' if cuda_extension_built() else 'not built'}")
    print(f"  GPU             {gpu}")
    print(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, status in available_backends(device).items():
        print(f"  backend {name:<7} {'yes' if status.available else 'no '}  {status.reason}")
    print()


def run_parity_table() -> bool:
    import torch

    from .backend import available_backends
    from .testing import DTYPE_IDS, TOLERANCE, make_tokens, module_parity_errors

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    backends = [name for name, status in available_backends(device).items() if status.available]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    header = f"{'op':<5} {'shape':<18} {'backend':<8} {'dtype':<5} {'max rel err':>11} {'tol':>6}  result"
    if on_gpu:
        header += f" {'fwd ms':>8} {'timm ms':>8} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    all_ok = True
    for op, label, make_timm, fused_cls, (batch, height, width, chans) in _op_cases(on_gpu):
        for backend in backends:
            for dtype in dtypes:
                torch.manual_seed(0)
                x = make_tokens(batch, height, width, chans, dtype, device)
                errors = module_parity_errors(make_timm(), lambda m: fused_cls.from_module(m, backend=backend),
                                              x, (height, width), dtype)
                worst = max(errors.values())
                ok = worst <= TOLERANCE[dtype]
                all_ok &= ok
                line = (f"{op:<5} {label:<18} {backend:<8} {DTYPE_IDS[dtype]:<5} {worst:>11.2e} "
                        f"{TOLERANCE[dtype]:>6.0e}  {'ok  ' if ok else 'FAIL'}")
                if on_gpu:
                    line += _timing_columns(make_timm, fused_cls, backend, x, (height, width))
                print(line, flush=True)
    return all_ok


def _timing_columns(make_timm, fused_cls, backend, x, size) -> str:
    from .bench import median_cuda_ms

    timm_module = make_timm().to(x.device, x.dtype)
    fused = fused_cls.from_module(timm_module, backend=backend)
    fused_ms = median_cuda_ms(lambda: fused(x, size), TIMED_CALLS)
    timm_ms = median_cuda_ms(lambda: timm_module(x, size), TIMED_CALLS)
    return f" {fused_ms:>8.3f} {timm_ms:>8.3f} {timm_ms / fused_ms:>6.2f}x"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m twins_kernels",
        description="Checks every fused op on every backend this machine can run against timm's modules (the "
                    "default, parity), or times a patched timm model (bench).")
    parser.add_argument("--no-interpret", action="store_true",
                        help="on a CPU-only machine, do not re-run under TRITON_INTERPRET=1")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("parity", help="the environment and the parity table (the default)")
    from . import bench

    bench.add_arguments(commands.add_parser(
        "bench", help="whole-model parity and images/s of a patched model", description=bench.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    if not args.no_interpret:
        _reexec_with_interpreter(argv)
    print_environment()
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed: the checks compare against timm's modules (pip install timm)")
        return 1
    if args.command == "bench":
        return bench.run(args)
    ok = run_parity_table()
    print()
    print("all parity checks passed" if ok else "SOME PARITY CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
