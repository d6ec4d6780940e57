"""Compile every Triton kernel the ops launch for NVIDIA GPUs, on a machine without one.

The interpreter (how the CPU tests run the kernels) is permissive where the GPU compiler is not: it
never lowers ``tl.dot`` to MMA, never allocates shared memory and never meets a register limit, so
a kernel can pass every CPU test and still fail to compile, or fail to launch ("out of resources:
shared memory"), on the first GPU it meets. This script runs the real launchers (``*_triton`` in
``twins_kernels.ops``) on CPU tensors with a compile-only Triton driver: each launch is specialized
exactly as on a GPU (dtypes, constexprs, tile choice, 16-byte alignment and divisibility of the
arguments) and compiled through TTGIR, PTX and ptxas to a cubin for each requested architecture,
but never run. For every distinct kernel it records the shared memory, registers, stack bytes
(spills; cuobjdump's resource usage), the tensor-core instructions and the compile time, and it
fails a kernel that does not compile or needs more shared memory than one block of that
architecture may have.

    python tests/triton_aot.py --arch 90 --arch 80 --markdown report.md --json report.json

Run it without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones);
tests/test_triton_aot.py runs it in a subprocess. It needs Triton's NVIDIA backend, which ships
ptxas and cuobjdump in the wheel, and no CUDA driver or GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

# Bytes of shared memory one block may use (the opt-in maximum Triton launches with): the CUDA
# programming guide's "maximum amount of shared memory per thread block" per compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Per SM, from the CUDA programming guide's table of technical specifications (compute capability 8.x
# and 9.0 alike, but for shared memory): registers, warps, blocks, and shared memory (of which each
# block's launch reserves 1 KiB).
REGISTERS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
SHARED_MEMORY_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


def resident_warps(arch: int, num_warps: int, registers: int, shared: int) -> int:
    """Warps of one kernel an SM holds at once (its occupancy, of WARPS_PER_SM): registers are
    allocated a warp at a time, 8 a thread at a time (256 a warp)."""
    if not num_warps:
        return 0
    per_warp = -(-max(registers, 1) // 8) * 8 * 32
    blocks = min(BLOCKS_PER_SM, WARPS_PER_SM // num_warps, REGISTERS_PER_SM // (per_warp * num_warps),
                 SHARED_MEMORY_PER_SM[arch] // (shared + 1024))
    return blocks * num_warps


# A launch grid's largest extent per axis (x, y, z): CUDA's "maximum grid dimensions" for every
# compute capability Triton supports.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# Kernels with no tl.dot: the summary does not ask whether their dots use tensor cores.
NO_DOT_KERNELS = ("peg_conv3x3_kernel", "peg_weight_grad_kernel", "gsa_subsample_norm_backward_kernel")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
QUICK_DTYPES = ("fp32", "bf16", "fp64")  # fp16 takes bf16's tiles and tensor-core path
HEAD_DIMS = (16, 32, 64, 128)  # the kernels' range, Twins' 32 and 64 within it
WINDOW_SIZES = (4, 7, 12)  # LSA's 16-slot tiles, one 64-slot block (Twins' 7), and 4 x 4 blocks


@dataclass
class KernelBuild:
    """One compiled specialization of one kernel for one architecture, or why it failed."""
    arch: int
    kernel: str
    case: str  # the first launch case that needed this specialization
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0  # bytes of shared memory per block
    registers: int = 0  # per thread
    stack: int = 0  # stack-frame bytes per thread: spilled registers
    seconds: float = 0.0  # compile time, through ptxas
    tensor_cores: str = ""  # the MMA instructions in the PTX: "wgmma" (sm_90), "mma" or "" (FMA only)
    atomics: str = ""  # the atomic instructions in the PTX (atom.*, red.*), "" for none
    constexprs: dict = field(default_factory=dict)
    error: str = ""

    @property
    def problems(self) -> list[str]:
        found = [self.error] if self.error else []
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if not self.error and self.shared > limit:
            found.append(f"needs {self.shared} bytes of shared memory; sm_{self.arch} allows {limit} per block")
        return found

    @property
    def warps_per_sm(self) -> int:
        return 0 if self.error else resident_warps(self.arch, self.num_warps, self.registers, self.shared)


# ----------------------------------------------------------------------------------------------
# A Triton driver that compiles for a chosen GPU and launches nothing
# ----------------------------------------------------------------------------------------------
def compile_only_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Triton's JIT asks the active driver for the device, its stream and its target. The device
        id is the architecture, so each architecture gets its own JIT cache."""

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return arch

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile-only driver: nothing is launched")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver: nothing is launched")

    return CompileOnlyDriver()


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack-frame bytes) per thread of a cubin's one kernel, from cuobjdump. The stack
    frame holds what did not fit the registers: spills (and arrays indexed at run time)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    return int(match.group(1)), int(match.group(2))


def mma_instructions(ptx: str) -> str:
    """Which tensor-core instructions a kernel's PTX issues: "wgmma" (Hopper's warpgroup MMA), "mma"
    (mma.sync) or "" when its dots run on the FMA units."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else ""


def atomic_instructions(ptx: str) -> str:
    """The atomic read-modify-write instructions a kernel's PTX issues (``atom.global.add.f32``, say),
    comma-separated, or "" for none."""
    return ", ".join(sorted(set(re.findall(r"^\s*(?:@!?%\w+\s+)?((?:atom|red)\.[\w.]+)", ptx, re.MULTILINE))))


class CompileRecorder:
    """Replaces JITFunction.run: compile (``warmup=True``: no launch) and record each new kernel."""

    def __init__(self):
        self.builds: dict[tuple, KernelBuild] = {}
        self.arch = 0
        self.case = ""
        self.uses: list[tuple] = []  # the builds' keys, in launch order, compiled or found compiled

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._original_run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.check_grid(fn, grid)
            return recorder.compile(fn, args, kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._original_run

    def check_grid(self, fn, grid):
        """A launch whose grid is past CUDA's limits fails on the GPU ("invalid argument") and runs in
        the interpreter: recorded as a problem of its kernel."""
        dims = tuple(grid) + (1,) * (3 - len(grid))
        if any(d > limit for d, limit in zip(dims, GRID_LIMITS)):
            key = (self.arch, fn.__name__, self.case, "grid")
            self.builds[key] = KernelBuild(self.arch, fn.__name__, self.case,
                                           error=f"grid {tuple(grid)} is past CUDA's limits (x, y, z) <= {GRID_LIMITS}")
            self.uses.append(key)

    def compile(self, fn, args, kwargs):
        constexprs = {p.name: _describe(value) for p, value in zip(fn.params, args) if p.is_constexpr}
        constexprs.update({k: _describe(v) for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
        start = time.perf_counter()
        try:
            kernel = self._original_run(fn, *args, grid=None, warmup=True, **kwargs)
        except Exception as exc:  # a compile error is a result to report, not a crash of the check
            key = (self.arch, fn.__name__, self.case, tuple(constexprs.items()), kwargs.get("num_warps"),
                   kwargs.get("num_stages"))  # each failing specialization of the case is its own row
            message = f"{type(exc).__name__}: {exc}".strip().splitlines()
            self.builds[key] = KernelBuild(self.arch, fn.__name__, self.case, kwargs.get("num_warps", 0),
                                           kwargs.get("num_stages", 0), constexprs=constexprs,
                                           error=" | ".join(message[:6]))
            self.uses.append(key)
            return None
        key = (self.arch, fn.__name__, kernel.metadata.hash)
        if key not in self.builds:
            registers, stack = resource_usage(kernel.asm["cubin"])
            ptx = kernel.asm["ptx"]
            self.builds[key] = KernelBuild(self.arch, fn.__name__, self.case, kernel.metadata.num_warps,
                                           kernel.metadata.num_stages, kernel.metadata.shared, registers, stack,
                                           time.perf_counter() - start, mma_instructions(ptx),
                                           constexprs=constexprs, atomics=atomic_instructions(ptx))
        self.uses.append(key)
        return kernel


def _describe(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


# ----------------------------------------------------------------------------------------------
# Launch cases: every tile and dtype specialization the ops choose, on small CPU tensors
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchCase:
    name: str
    launch: Callable[[], None]


def _ops():
    # the op modules by their full names: twins_kernels.ops.peg etc. are also the names of functions
    return (sys.modules["twins_kernels.ops.peg"], sys.modules["twins_kernels.ops.lsa"],
            sys.modules["twins_kernels.ops.gsa"])


def peg_cases(dtypes) -> Iterator[LaunchCase]:
    peg, _, _ = _ops()
    # (C, H, W): Twins' stage-1 map (64-channel blocks, 64-token rows), a late stage (128-channel
    # blocks, short rows), and an odd C on a strided view (no divisibility to specialize on)
    shapes = [(64, 56, 56, True), (512, 7, 7, True), (100, 1, 31, False)]
    for (name, dtype), (chans, height, width, contiguous) in itertools.product(dtypes.items(), shapes):
        def launch(dtype=dtype, chans=chans, height=height, width=width, contiguous=contiguous):
            wide = torch.randn(2, height * width, 2 * chans).to(dtype)
            x = wide[..., :chans].contiguous() if contiguous else wide[..., ::2]
            weight, bias = torch.randn(chans, 1, 3, 3), torch.randn(chans)
            peg.peg_conv3x3_triton(x, weight, bias, height, width)
            peg.peg_conv3x3_triton(x, weight, None, height, width, flip_weight=True)
            peg.peg_weight_grad_triton(x, x, height, width)
        yield LaunchCase(f"peg-{name}-C{chans}-{height}x{width}", launch)


def lsa_cases(dtypes, head_dims, window_sizes, quick: bool) -> Iterator[LaunchCase]:
    _, lsa, _ = _ops()
    for (name, dtype), head_dim, ws in itertools.product(dtypes.items(), head_dims, window_sizes):
        # a padded map (padded keys hold the bias), an exact one (no padding) and mask padding; the
        # last two only change flags, so quick runs them for Twins' own ws 7 at head_dim 32 and 64
        pads = (("zero", (2 * ws - 1, ws + 3), False), ("exact", (2 * ws, 2 * ws), False),
                ("mask", (2 * ws - 1, ws + 3), True))
        if quick and not (ws == 7 and head_dim in (32, 64)):
            pads = pads[:1]
        for pad, (height, width), mask in pads:
            def launch(dtype=dtype, head_dim=head_dim, ws=ws, height=height, width=width, mask=mask):
                heads = 2
                chans = heads * head_dim
                qkv = torch.randn(2, height * width, 3 * chans).to(dtype)
                bias = torch.randn(3 * chans).to(dtype)
                scale = head_dim ** -0.5
                out, lse = lsa.lsa_forward_triton(qkv, bias, height, width, ws, heads, scale, mask)
                lsa.lsa_backward_triton(torch.randn_like(out), qkv, bias, out, lse, height, width, ws, heads, scale, mask)
            yield LaunchCase(f"lsa-{name}-hd{head_dim}-ws{ws}-{pad}", launch)


def gsa_cases(dtypes, head_dims) -> Iterator[LaunchCase]:
    _, _, gsa = _ops()
    # keys: 1 (sr 8 on a 14x14 map: the smallest key block), 20 (fp32's 32-key block), 49 (sr 8 at 56x56)
    # and 300 (several blocks: the backward's dq kernel), all but 1 one key block in 16 bits (the dk/dv kernel
    # computes dq); enough queries for the largest query block
    key_counts = (1, 20, 49, 300)

    def attention(dtype, batch, tokens, keys, head_dim, heads=2):
        """A launch of the attention forward and backward on q (batch, tokens, C), kv (batch, keys, 2C)."""

        def launch():
            chans = heads * head_dim
            q = torch.randn(batch, tokens, chans).to(dtype)
            kv = torch.randn(batch, keys, 2 * chans).to(dtype)
            out, lse = gsa.gsa_attention_forward_triton(q, kv, heads, head_dim ** -0.5)
            gsa.gsa_attention_backward_triton(torch.randn_like(out), q, kv, out, lse, heads, head_dim ** -0.5)
        return launch

    for (name, dtype), head_dim, keys in itertools.product(dtypes.items(), head_dims, key_counts):
        yield LaunchCase(f"gsa-{name}-hd{head_dim}-M{keys}", attention(dtype, 2, 259, keys, head_dim))
    # B * heads past 65535 (batch 2048 at Twins-SVT-L's 32 last-stage heads): one token, one key
    for name, dtype in dtypes.items():
        yield LaunchCase(f"gsa-{name}-hd16-B32769", attention(dtype, 32769, 1, 1, 16))
    # sub-sampling: C = 64 (one output-channel block) and 320 (PCPVT stage 2: blocks that do not divide C)
    for (name, dtype), (chans, sr) in itertools.product(dtypes.items(), ((64, 8), (320, 2))):
        def launch(dtype=dtype, chans=chans, sr=sr):
            height, width = 3 * sr + 1, 2 * sr
            x = torch.randn(2, height * width, chans).to(dtype)
            weight, bias = torch.randn(chans, chans, sr, sr), torch.randn(chans)
            norm_weight, norm_bias = torch.randn(chans), torch.randn(chans)
            out, y, mean, rstd = gsa.gsa_subsample_forward_triton(x, weight, bias, norm_weight, norm_bias,
                                                                  height, width, sr, 1e-5)
            gsa.gsa_subsample_backward_triton(torch.randn_like(out), x, weight, norm_weight, y, mean, rstd,
                                              height, width, sr)
        yield LaunchCase(f"gsa_subsample-{name}-C{chans}-sr{sr}", launch)

    # sr * sr taps past 65535 (sr = 256, one patch of a 256 x 256 map): the taps share axis 0 with the rows
    name, dtype = next(iter(dtypes.items()))

    def one_patch(sr=256, chans=16):
        x = torch.randn(1, sr * sr, chans).to(dtype)
        weight, params = torch.randn(chans, chans, sr, sr), [torch.randn(chans) for _ in range(3)]
        out, y, mean, rstd = gsa.gsa_subsample_forward_triton(x, weight, *params, sr, sr, sr, 1e-5)
        gsa.gsa_subsample_backward_triton(torch.randn_like(out), x, weight, params[1], y, mean, rstd, sr, sr, sr)
    yield LaunchCase(f"gsa_subsample-{name}-C16-sr256", one_patch)


def all_cases(dtypes=DTYPES, head_dims=HEAD_DIMS, window_sizes=WINDOW_SIZES, quick: bool = False) -> list[LaunchCase]:
    """Launch cases over dtypes x head_dims (x window sizes for LSA). ``quick`` leaves out cases that
    only repeat another's tiles with other flags (about half the builds: what CI runs)."""
    return [*peg_cases(dtypes), *lsa_cases(dtypes, head_dims, window_sizes, quick),
            *gsa_cases(dtypes, head_dims)]


# ----------------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------------
def compile_all(archs, cases, log=None) -> list[KernelBuild]:
    """Compile what ``cases`` launch for each of ``archs``. The process's Triton driver stays the
    compile-only one afterwards: this is for a process that launches nothing."""
    from triton.runtime.driver import driver

    with CompileRecorder() as recorder:
        for arch in archs:
            driver.set_active(compile_only_driver(arch))
            recorder.arch = arch
            for case in cases:
                recorder.case = case.name
                try:
                    case.launch()
                except Exception:  # a launcher failing outside the compiler is a result too
                    message = traceback.format_exc(limit=3).strip().splitlines()[-1]
                    recorder.builds[(arch, "launcher", case.name)] = KernelBuild(arch, "launcher", case.name,
                                                                                 error=message)
                if log:
                    log(f"sm_{arch} {case.name}: {len(recorder.builds)} kernels so far")
    return list(recorder.builds.values())


def compile_sweeps(arch: int, names=(), log=None) -> list[dict]:
    """Each candidate of benchmarks/sweep_tiles.py's sweeps (the default tiles first) compiled for
    ``arch`` at the sweep's own shapes: the kernels its pass launches, their worst registers, stack and
    shared memory, and their problems (a candidate that cannot launch costs a GPU sweep nothing to
    know beforehand). Candidates that come to the same tiles are listed once."""
    from triton.runtime.driver import driver

    sweep_tiles = _load_sweep_tiles()
    driver.set_active(compile_only_driver(arch))
    rows = []
    with CompileRecorder() as recorder:
        recorder.arch = arch
        for sweep in sweep_tiles.SWEEPS:
            if names and sweep.name not in names:
                continue
            recorder.case = f"{sweep.name}-setup"
            run = sweep.setup(sweep_tiles.SHAPES["headline"][sweep.shape], "cpu")
            seen = set()
            for candidate in (None, *sweep.candidates):
                recorder.case, recorder.uses = f"{sweep.name} {candidate or 'default'}", []
                with sweep_tiles.tiles_from(sweep, candidate) as chosen:
                    try:
                        run()
                        launch_error = ""
                    except Exception as exc:  # e.g. tiles the launcher refuses: a result, as a compile error
                        launch_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                tiles = sweep_tiles._describe(chosen[0]) if chosen else str(candidate)
                if tiles in seen:
                    continue
                seen.add(tiles)
                builds = [recorder.builds[key] for key in dict.fromkeys(recorder.uses)]
                problems = [p for b in builds for p in b.problems] + ([launch_error] if launch_error else [])
                rows.append(dict(arch=arch, sweep=sweep.name, tiles=tiles, default=candidate is None,
                                 kernels=sorted({b.kernel for b in builds}),
                                 registers=max((b.registers for b in builds), default=0),
                                 stack=max((b.stack for b in builds), default=0),
                                 shared=max((b.shared for b in builds), default=0),
                                 warps_per_sm=min((b.warps_per_sm for b in builds), default=0), problems=problems))
            if log:
                log(f"sm_{arch} {sweep.name}: {sum(r['sweep'] == sweep.name for r in rows)} tiles")
    return rows


def _load_sweep_tiles():
    """benchmarks/sweep_tiles.py, with benchmarks/conftest.py as the ``conftest`` it imports (this
    script's own directory, tests/, has the other conftest)."""
    import importlib.util

    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    for name in ("conftest", "sweep_tiles"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(benchmarks, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def sweep_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             f"warps/SM: the fewest warps of one of the pass's kernels an SM holds at once (of {WARPS_PER_SM}).", "",
             "| arch | sweep | tiles | kernels | regs | stack B | shared KiB | warps/SM | problems |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        tiles = f"{r['tiles']} (default)" if r["default"] else r["tiles"]
        problems = "; ".join(r["problems"]).replace("|", "/")
        lines.append(f"| sm_{r['arch']} | {r['sweep']} | {tiles} | {', '.join(r['kernels'])} | {r['registers']} | "
                     f"{r['stack']} | {r['shared'] / 1024:.1f} | {r['warps_per_sm']} | {problems} |")
    return "\n".join(lines) + "\n"


def markdown(builds: list[KernelBuild], header: str) -> str:
    """A summary per architecture, op and dtype (worst case over its builds), then every build."""
    groups: dict[tuple, list[KernelBuild]] = {}
    for b in builds:
        op, dtype = b.case.split("-")[:2]
        groups.setdefault((b.arch, op, dtype), []).append(b)
    lines = [header, "",
             "| arch | op | dtype | builds | max shared KiB | max regs | max stack B | dots on tensor cores | problems |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for (arch, op, dtype), group in sorted(groups.items()):
        mma = sorted({b.tensor_cores or "FMA" for b in group if b.kernel not in NO_DOT_KERNELS})
        lines.append(f"| sm_{arch} | {op} | {dtype} | {len(group)} | {max(b.shared for b in group) / 1024:.1f} | "
                     f"{max(b.registers for b in group)} | {max(b.stack for b in group)} | {', '.join(mma) or 'no dots'} | "
                     f"{sum(len(b.problems) for b in group)} |")
    lines += ["", "Every build (the first launch case that needed each specialization):", "",
              "| arch | kernel | first case | warps | stages | shared KiB | regs | stack B | warps/SM | MMA "
              "| problem |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for b in sorted(builds, key=lambda b: (b.arch, b.kernel, b.case)):
        problem = "; ".join(b.problems).replace("|", "/")
        lines.append(f"| sm_{b.arch} | {b.kernel} | {b.case} | {b.num_warps} | {b.num_stages} | "
                     f"{b.shared / 1024:.1f} | {b.registers} | {b.stack} | {b.warps_per_sm} | "
                     f"{b.tensor_cores or '-'} | {problem} |")
    return "\n".join(lines) + "\n"


def case_dtype(case: LaunchCase) -> str:
    """The dtype a case launches its kernels in: its name's second field (``lsa-fp32-hd32-ws7-zero``)."""
    return case.name.split("-")[1]


def load_builds(path: str) -> tuple[str, list[KernelBuild]]:
    """The header and builds of a --json report."""
    with open(path) as f:
        saved = json.load(f)
    fields = {f.name for f in dataclasses.fields(KernelBuild)}
    return saved["header"], [KernelBuild(**{k: v for k, v in b.items() if k in fields}) for b in saved["builds"]]


def compile_in_processes(args, archs: list[int], cases: list[LaunchCase],
                         dtype_names: list[str]) -> list[KernelBuild]:
    """The builds of ``cases``, from ``args.jobs`` processes of this script that each compile the cases of
    their share of ``dtype_names``: a kernel compiled in one dtype is no build of another's, so none is
    compiled twice."""
    unshared = [c.name for c in cases if case_dtype(c) not in dtype_names]
    if unshared:
        raise ValueError(f"cases named with no dtype of {dtype_names}: {unshared}")
    shares = [dtype_names[i::args.jobs] for i in range(min(args.jobs, len(dtype_names)))]
    options = [*(f"--arch={a}" for a in archs), *(f"--dtype={d}" for d in dtype_names), "-k", args.select,
               *(f"--head-dim={h}" for h in args.head_dim or ()), *(f"--ws={w}" for w in args.ws or ()),
               *(["--quick"] if args.quick else [])]
    with tempfile.TemporaryDirectory() as folder:
        runs = []
        for index, share in enumerate(shares):
            report = os.path.join(folder, f"{index}.json")
            command = [sys.executable, os.path.abspath(__file__), *options, "--case-dtypes", ",".join(share),
                       "--json", report]
            runs.append((subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                         report))
        builds = []
        for process, report in runs:
            output, _ = process.communicate()
            if not os.path.exists(report):
                raise RuntimeError(f"a compile process wrote no report:\n{output[-4000:]}")
            builds += load_builds(report)[1]
    return builds


def summarize(builds: list[KernelBuild], header: str) -> int:
    """Print the header, every problem and every spill; 1 if any build has a problem."""
    failed = [b for b in builds if b.problems]
    print(header)
    for b in failed:
        print(f"FAILED sm_{b.arch} {b.kernel} ({b.case}): {'; '.join(b.problems)}")
    for b in sorted((b for b in builds if b.stack), key=lambda b: (b.arch, b.kernel, b.case)):
        print(f"spills sm_{b.arch} {b.kernel} ({b.case}): {b.registers} registers and {b.stack} stack bytes per thread")
    print(f"{len(builds) - len(failed)} of {len(builds)} kernel builds compile and fit")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability as an int (90 = sm_90); repeatable; default 90 and 80")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default all")
    parser.add_argument("--head-dim", type=int, action="append", help=f"repeatable; default {HEAD_DIMS}")
    parser.add_argument("--ws", type=int, action="append", help=f"LSA window sizes; default {WINDOW_SIZES}")
    parser.add_argument("--quick", action="store_true",
                        help=f"leave out cases that repeat another's tiles; dtypes default to {QUICK_DTYPES}")
    parser.add_argument("-k", dest="select", default="", help="only cases whose name contains this")
    parser.add_argument("--json", help="write every build as JSON here")
    parser.add_argument("--markdown", help="write the summary and every build as markdown here")
    parser.add_argument("--from-json", help="compile nothing: report the builds of an earlier --json")
    parser.add_argument("--sweeps", nargs="*", metavar="NAME",
                        help="instead: compile benchmarks/sweep_tiles.py's candidates (these sweeps; none named: all) "
                             "and write their resources (--json, --markdown)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile in this many processes, each the cases of its share of the dtypes")
    parser.add_argument("--case-dtypes", help=argparse.SUPPRESS)  # a --jobs process's share, comma-separated
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.from_json and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if args.sweeps is not None:
        return sweep_main(args)

    if args.from_json:
        header, builds = load_builds(args.from_json)
    else:
        import triton
        from triton import knobs

        import twins_kernels  # noqa: F401  (defines the kernels as JIT functions)

        archs = args.arch or [90, 80]
        dtypes = {name: DTYPES[name] for name in args.dtype or (QUICK_DTYPES if args.quick else DTYPES)}
        cases = [c for c in all_cases(dtypes, tuple(args.head_dim or HEAD_DIMS), tuple(args.ws or WINDOW_SIZES),
                                      args.quick) if args.select in c.name]
        if args.case_dtypes:
            cases = [c for c in cases if case_dtype(c) in args.case_dtypes.split(",")]
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
        if args.jobs > 1:
            builds = compile_in_processes(args, archs, cases, list(dtypes))
        else:
            builds = compile_all(archs, cases, log)
        ptxas = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
        ptxas_version = re.search(r"release (\S+),", ptxas)
        header = (f"{datetime.date.today()}, compiled on a machine without a GPU (nothing launched): Triton "
                  f"{triton.__version__}, torch {torch.__version__}, ptxas "
                  f"{ptxas_version.group(1) if ptxas_version else '?'}; {len(cases)} launch cases, "
                  f"{len(builds)} kernel builds for " + ", ".join(f"sm_{a}" for a in archs))
    if args.json and not args.from_json:
        rows = ",\n".join(json.dumps({**asdict(b), "problems": b.problems, "warps_per_sm": b.warps_per_sm})
                          for b in builds)
        with open(args.json, "w") as f:
            f.write(f'{{"header": {json.dumps(header)},\n"builds": [\n{rows}\n]}}\n')  # a build a line
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(builds, header))
    return summarize(builds, header)


def sweep_main(args) -> int:
    import triton

    import twins_kernels  # noqa: F401  (defines the kernels as JIT functions)

    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    rows = [row for arch in args.arch or [90] for row in compile_sweeps(arch, args.sweeps, log)]
    header = (f"{datetime.date.today()}, compiled on a machine without a GPU (nothing launched): Triton "
              f"{triton.__version__}, torch {torch.__version__}; the tile sweep's candidates "
              f"(benchmarks/sweep_tiles.py) at its headline shapes, bf16")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(sweep_markdown(rows, header))
    unfit = [r for r in rows if r["problems"]]
    print(f"{header}\n{len(rows) - len(unfit)} of {len(rows)} candidate tiles compile and fit")
    for r in unfit:
        print(f"  sm_{r['arch']} {r['sweep']} {r['tiles']}: {'; '.join(r['problems'])[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
