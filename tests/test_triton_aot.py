"""Every Triton kernel compiles for the GPUs the package targets, and fits them, checked without a GPU.

tests/triton_aot.py runs the real launchers with a compile-only Triton driver (see its docstring).
Each architecture runs in its own subprocess, concurrently: the kernels must be JIT functions, and
this process has them interpreted (TRITON_INTERPRET=1) when there is no GPU.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import HAS_GPU, ROOT, held_across_workers, shared_tmp_dir

ARCHS = (90, 80)  # TORCH_CUDA_ARCH_LIST's default: H100 and A100
# sm_90 (the H100s the GPU sessions run on) compiles the quick cases users run, fp32 and bf16 (fp16 takes
# bf16's tiles); fp64, a test dtype (gradcheck), is compiled for sm_90 by `make gpu-versions` with the GPU
# machine's Triton, whose builds are the ones GPU sessions launch (here, 1.5 minutes of a core for no
# other check). sm_80 compiles the bf16 ones, whose tensor-core lowering (mma.sync there, wgmma on sm_90)
# and shared memory (up to 96 KiB) are what differ by architecture. Its fp32 and fp64 kernels run their
# dots on the FMA units as sm_90's do, their tiles far inside its 163 KiB (at most 42 and 85 KiB):
# compiled, they took a core 3-4 minutes of CI for no other check; `make kernel-report` compiles the
# whole matrix for both.
ARCH_DTYPES = {90: ("fp32", "bf16"), 80: ("bf16",)}


TRITON_AOT = os.path.join(ROOT, "tests", "triton_aot.py")


def compiling_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET: a process started with it defines the kernels as
    JIT functions, which compile."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_triton_aot(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``tests/triton_aot.py args`` in a process with compiling_env()."""
    return subprocess.run([sys.executable, TRITON_AOT, *args], env=compiling_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=check)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every launch case compiled for each of ARCHS, once a pytest run: the first pytest-xdist worker that
    needs the builds compiles them (minutes of every core), and another reads its reports rather than
    compiling them all again."""
    if HAS_GPU:
        pytest.skip("a GPU is present: the GPU tests compile and launch every kernel for real")
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas ships with it)")
    folder = shared_tmp_dir(tmp_path_factory)
    reports = {arch: folder / f"aot-sm_{arch}.json" for arch in ARCHS}
    with held_across_workers(tmp_path_factory, "aot"):
        runs = {}
        for arch, report in reports.items():
            if not report.exists():  # a failed compile check writes none: the next worker runs it again
                command = [sys.executable, TRITON_AOT, "--quick", "--arch", str(arch),
                           *(f"--dtype={dtype}" for dtype in ARCH_DTYPES[arch]), "--json", str(report)]
                runs[arch] = subprocess.Popen(command, env=compiling_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)
        for arch, process in runs.items():
            output, _ = process.communicate(timeout=1800)
            assert reports[arch].exists(), f"sm_{arch}: the compile check produced no report:\n{output[-4000:]}"
    return [build for report in reports.values() for build in json.loads(report.read_text())["builds"]]


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_every_kernel_compiles_and_fits(builds, arch):
    ours = [b for b in builds if b["arch"] == arch]
    kernels = {b["kernel"] for b in ours}
    expected = {"peg_conv3x3_kernel", "lsa_forward_kernel", "lsa_backward_dq_kernel", "gsa_attention_dkdv_kernel",
                "gsa_attention_dq_kernel", "gsa_subsample_input_grad_kernel"}
    assert expected <= kernels, f"launch cases missing: only {sorted(kernels)}"
    failed = [f"{b['kernel']} ({b['case']}): {'; '.join(b['problems'])}" for b in ours if b["problems"]]
    assert not failed, f"{len(failed)} of {len(ours)} builds for sm_{arch} fail:\n" + "\n".join(failed)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_16bit_dots_run_on_tensor_cores(builds, arch):
    """A 16-bit tl.dot that lowered to FMA (a layout or shape the MMA path refuses) would be correct and
    several times slower: every bf16 kernel with dots must issue tensor-core MMAs. On sm_90, Twins' own
    attention tiles (LSA ws 7, GSA on 49 keys: a 64-key block, 4 warps) must use Hopper's wgmma; smaller
    blocks (ws 4, one key, the launch cases' few patches) may use mma.sync."""
    from triton_aot import NO_DOT_KERNELS

    bf16 = [b for b in builds if b["arch"] == arch and "-bf16-" in b["case"] and b["kernel"] not in NO_DOT_KERNELS]
    assert bf16, "no bf16 builds"
    on_fma = [f"{b['kernel']} ({b['case']})" for b in bf16 if not b["tensor_cores"]]
    assert not on_fma, "bf16 dots on the FMA units:\n" + "\n".join(on_fma)
    if arch == 90:
        twins_tiles = [b for b in bf16 if "-ws7-" in b["case"] or (b["case"].startswith("gsa-") and b["case"].endswith("-M49"))]
        assert twins_tiles
        no_wgmma = [f"{b['kernel']} ({b['case']}): {b['tensor_cores']}" for b in twins_tiles if b["tensor_cores"] != "wgmma"]
        assert not no_wgmma, "Twins' tiles without wgmma on sm_90:\n" + "\n".join(no_wgmma)


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_no_kernel_uses_atomics(builds, arch):
    """No atomics anywhere (fixed partitions, partial sums added in a fixed order): a float atomic's order,
    and with it the sum's rounding, varies from run to run on a GPU, so a backward with one would not be
    bitwise reproducible; the interpreter runs the programs one after another and cannot show that."""
    with_atomics = [f"{b['kernel']} ({b['case']}): {b['atomics']}"
                    for b in builds if b["arch"] == arch and b["atomics"]]
    assert not with_atomics, "atomics in the PTX:\n" + "\n".join(with_atomics)


ATOMIC_KERNEL = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, "tests")
from triton_aot import LaunchCase, compile_all

@triton.jit
def sum_with_atomics_kernel(a_ptr, total_ptr):
    tl.atomic_add(total_ptr, tl.load(a_ptr + tl.program_id(0)))

launch = lambda: sum_with_atomics_kernel[(4,)](torch.randn(4), torch.zeros(1))
print("ATOMICS:", [b.atomics for b in compile_all([90], [LaunchCase("atomic-sum", launch)])])
"""


def test_compile_check_finds_an_atomic_add(tmp_path):
    result = run_compile_script(tmp_path, "atomic_kernel.py", ATOMIC_KERNEL)
    assert "ATOMICS: [" in result.stdout, result.stdout + result.stderr
    assert ".add.f32" in result.stdout.split("ATOMICS:", 1)[1], result.stdout


# A kernel the interpreter runs happily and the GPU compiler rejects: a loop unrolled at compile time
# (tl.static_range) over a bound known only at run time.
BROKEN_KERNEL = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, "tests")
from triton_aot import LaunchCase, compile_all

@triton.jit
def runtime_unroll_kernel(a_ptr, n, SCALE: tl.constexpr):
    total = 0.0
    for i in tl.static_range(n):
        total += tl.load(a_ptr + i)
    tl.store(a_ptr, total * SCALE)

def launch():
    for scale in (1.0, 2.0):  # two specializations in one case: each failure is reported
        runtime_unroll_kernel[(1,)](torch.randn(4), 4, SCALE=scale)

builds = compile_all([90], [LaunchCase("runtime-unroll", launch)])
print("PROBLEMS:", [p for b in builds for p in b.problems])
"""


def run_compile_script(tmp_path, name: str, source: str) -> subprocess.CompletedProcess:
    """Run ``source`` as tmp_path/``name`` (Triton reads a kernel's source from its file) in a process without
    TRITON_INTERPRET, importing this tree's twins_kernels."""
    script = tmp_path / name
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], env=compiling_env() | {"PYTHONPATH": ROOT}, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_compile_check_reports_a_kernel_the_gpu_compiler_rejects(tmp_path):
    result = run_compile_script(tmp_path, "broken_kernel.py", BROKEN_KERNEL)
    assert "PROBLEMS: [" in result.stdout, result.stdout + result.stderr
    problems = result.stdout.split("PROBLEMS:", 1)[1]
    assert "CompilationError" in problems and "static_range" in problems, problems
    assert problems.count("CompilationError") == 2, problems


@pytest.mark.parametrize("args", [["--quick"], ["--sweeps", "lsa-fwd"]], ids=["launch-cases", "sweeps"])
def test_the_compile_check_refuses_the_interpreter(args):
    """Under TRITON_INTERPRET the kernels are interpreted functions, which have nothing to compile."""
    result = subprocess.run([sys.executable, TRITON_AOT, *args], env=compiling_env() | {"TRITON_INTERPRET": "1"},
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr, result.stdout + result.stderr


# Each op launched on three maps of other sizes (a multiple of 16 among them) with the same model shapes,
# and GSA's attention against key counts that keep its tiles (one 64-key block; two, for its dq kernel):
# compiled once a tile choice, not once a size.
OTHER_IMAGE_SIZES = """
import sys, torch
sys.path.insert(0, "tests")
from triton_aot import LaunchCase, _ops, compile_all
import twins_kernels

peg, lsa, gsa = _ops()
dtype, heads, head_dim, chans = torch.float16, 2, 32, 64

def launch(height, width, keys):
    x = torch.randn(2, height * width, chans).to(dtype)
    peg.peg_conv3x3_triton(x, torch.randn(chans, 1, 3, 3), torch.randn(chans), height, width)
    peg.peg_weight_grad_triton(x, x, height, width)
    qkv, qkv_bias = torch.randn(2, height * width, 3 * chans).to(dtype), torch.randn(3 * chans).to(dtype)
    for ws in (7, 12):  # one key block (Twins), and two (the dq kernel)
        out, lse = lsa.lsa_forward_triton(qkv, qkv_bias, height, width, ws, heads, 0.2, False)
        lsa.lsa_backward_triton(torch.randn_like(out), qkv, qkv_bias, out, lse, height, width, ws, heads, 0.2, False)
    params = [torch.randn(chans) for _ in range(3)]
    sub, y, mean, rstd = gsa.gsa_subsample_forward_triton(x, torch.randn(chans, chans, 2, 2), *params,
                                                          height, width, 2, 1e-5)
    gsa.gsa_subsample_backward_triton(torch.randn_like(sub), x, torch.randn(chans, chans, 2, 2), params[1], y,
                                      mean, rstd, height, width, 2)
    for key_count in keys:
        kv = torch.randn(2, key_count, 2 * chans).to(dtype)
        out, lse = gsa.gsa_attention_forward_triton(x, kv, heads, 0.2)
        gsa.gsa_attention_backward_triton(torch.randn_like(out), x, kv, out, lse, heads, 0.2)

# batch 2: the last two maps' 600 and 8000 rows give PEG's weight gradient 2 and 16 rows a program
maps = [(13, 11, (33, 113)), (16, 16, (48, 96)), (2, 33, (64, 80)), (300, 11, (75,)), (4000, 11, (1000,))]
cases = [LaunchCase(f"{h}x{w}", lambda h=h, w=w, keys=keys: launch(h, w, keys)) for h, w, keys in maps]
for b in compile_all([90], cases):
    print("BUILD", b.kernel, b.num_warps, b.num_stages, sorted(b.constexprs.items()), b.problems)
"""


def test_other_image_sizes_reuse_the_compiled_kernels(tmp_path):
    """A new image size (detection, segmentation) must not compile the kernels again: Triton specializes
    int arguments on == 1 and divisibility by 16, which the kernels' size arguments opt out of (PEG's
    weight-gradient rows a program among them, which batch and image size set)."""
    if HAS_GPU:
        pytest.skip("a GPU is present: the compile-only driver is for machines without one")
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas ships with it)")
    result = run_compile_script(tmp_path, "image_sizes.py", OTHER_IMAGE_SIZES)
    builds = [line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("BUILD ")]
    assert builds, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(rest.endswith(" []") for _, rest in builds), builds  # compiled, no problems
    assert {kernel for kernel, _ in builds} == {
        "peg_conv3x3_kernel", "peg_weight_grad_kernel", "lsa_forward_kernel", "lsa_backward_kernel",
        "lsa_backward_dq_kernel", "gsa_subsample_forward_kernel", "gsa_subsample_norm_backward_kernel",
        "gsa_subsample_weight_grad_kernel", "gsa_subsample_input_grad_kernel", "gsa_attention_forward_kernel",
        "gsa_attention_dq_kernel", "gsa_attention_dkdv_kernel"}
    # a kernel compiled twice with the same tiles and flags was specialized on a size
    repeated = sorted({f"{kernel} {rest}" for kernel, rest in builds if builds.count([kernel, rest]) > 1})
    assert not repeated, "compiled again for another image size:\n" + "\n".join(repeated)


def test_processes_that_share_out_the_dtypes_compile_the_builds_of_one(tmp_path):
    if HAS_GPU:
        pytest.skip("a GPU is present: the compile-only driver is for machines without one")
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas ships with it)")
    reports = {}
    for jobs in (1, 2):
        reports[jobs] = tmp_path / f"jobs{jobs}.json"
        run_triton_aot("--arch", "90", "--dtype", "fp32", "--dtype", "bf16", "-k", "peg-", "--jobs", str(jobs),
                       "--json", str(reports[jobs]), check=True)
    one, shared = (json.loads(reports[jobs].read_text()) for jobs in (1, 2))
    assert one["header"] == shared["header"]

    def described(report):
        return sorted(json.dumps({k: v for k, v in b.items() if k != "seconds"}, sort_keys=True)
                      for b in report["builds"])
    assert len(one["builds"]) >= 4 and described(one) == described(shared)


def test_shared_memory_beyond_the_architecture_is_a_problem():
    from triton_aot import SHARED_MEMORY_LIMIT, KernelBuild

    fits = KernelBuild(90, "k", "case", shared=SHARED_MEMORY_LIMIT[90])
    too_big = KernelBuild(80, "k", "case", shared=SHARED_MEMORY_LIMIT[80] + 1)
    assert fits.problems == []
    assert "sm_80 allows" in too_big.problems[0]
    assert KernelBuild(90, "k", "case", error="CompilationError: x").problems == ["CompilationError: x"]


def test_a_grid_past_cuda_limits_is_a_problem():
    """The interpreter runs any grid; a GPU refuses a second or third axis past 65535 at launch."""
    from triton_aot import CompileRecorder

    def some_kernel():
        pass

    recorder = CompileRecorder()
    recorder.arch, recorder.case = 90, "case"
    recorder.check_grid(some_kernel, (2**31 - 1, 65535, 65535))
    assert not recorder.builds
    recorder.check_grid(some_kernel, (1, 65536))
    [(key, build)] = recorder.builds.items()
    assert build.kernel == "some_kernel" and "past CUDA's limits" in build.problems[0]
    assert recorder.uses == [key]  # a sweep's row lists the problems of the builds its launches used


def test_sweep_candidates_compile_with_their_own_tiles(tmp_path):
    """`triton_aot.py --sweeps` compiles benchmarks/sweep_tiles.py's candidates: each row is the pass's
    kernels built with that candidate's tiles (here LSA's forward: 2 or 8 warps, 1 or 2 stages, one
    window a block or two halves)."""
    if HAS_GPU:
        pytest.skip("a GPU is present: the sweep itself runs there")
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas ships with it)")
    report = tmp_path / "sweep.json"
    result = run_triton_aot("--sweeps", "lsa-fwd", "--arch", "90", "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert rows[0]["default"] and "block_q=64" in rows[0]["tiles"] and "num_warps=4" in rows[0]["tiles"]
    assert len(rows) == len({r["tiles"] for r in rows}) == 12  # the default is one of the 12 candidates
    assert all(r["kernels"] == ["lsa_forward_kernel"] and not r["problems"] for r in rows), rows
    warps = {r["tiles"]: r["registers"] for r in rows if "block_q=64" in r["tiles"] and "num_stages=1" in r["tiles"]}
    assert len(warps) == 3 and len(set(warps.values())) > 1  # the tiles reached the compiler


def test_resident_warps_follow_cudas_occupancy_limits():
    from triton_aot import KernelBuild, resident_warps

    assert resident_warps(90, 4, 66, 12 * 1024) == 28  # 72 registers a thread: 7 blocks of 4 warps
    assert resident_warps(90, 4, 255, 0) == 8  # 256 a thread: 8 warps, however they are grouped
    assert resident_warps(90, 4, 32, 0) == 64  # every warp the SM has
    assert resident_warps(90, 1, 16, 0) == 32  # at most 32 blocks
    assert resident_warps(90, 4, 32, 100 * 1024) == 8  # two blocks' shared memory (and 1 KiB each)
    assert resident_warps(80, 4, 32, 100 * 1024) == 4  # an A100's SM has 164 KiB
    assert KernelBuild(90, "k", "case", error="CompilationError").warps_per_sm == 0
