"""Shared benchmark machinery: device timing, the measured roofline, and what each case records.

Every case is timed two ways: pytest-benchmark's own clock around a call that synchronizes the GPU
(its table), and CUDA-event medians from ``triton.testing.do_bench`` (warm-up, L2 flushed between
runs), which ``extra_info`` turns into achieved GB/s, TFLOP/s, % of the measured copy bandwidth and
% of the measured roofline (the slower of the bytes at the copy bandwidth and the FLOPs at the matmul rate).
The two ceilings (device-to-device copy bandwidth, bf16 matmul TFLOP/s) are measured once per session.
Without a GPU every case is skipped with the reason, and the suite still passes. With ``--profile-case
ID`` one case runs alone, its call once inside the CUDA profiler's range and untimed, for Nsight
Compute (``run_gpu.sh profile``).
"""
from __future__ import annotations

import json

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# Where the cases run: the GPU (tests/test_benchmark_machinery.py runs each case's body once on the CPU).
DEVICE = "cuda"
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="benchmarks time CUDA kernels; no CUDA GPU is visible")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Twins-SVT-S: (embed dim, heads) per stage; the maps are the input size / (4, 8, 16, 32).
SVT_S_STAGES = [(64, 2), (128, 4), (256, 8), (512, 16)]
# Twins-PCPVT-S: (embed dim, heads, sr ratio) per stage.
PCPVT_S_STAGES = [(64, 1, 8), (128, 2, 4), (320, 5, 2), (512, 8, 1)]
STAGE_STRIDES = (4, 8, 16, 32)
IMAGE_SIZES = {224: 64, 512: 16, 1024: 2}  # image size -> batch


def stage_map(image_size: int, stage: int) -> tuple[int, int]:
    side = image_size // STAGE_STRIDES[stage]
    return side, side


VARIANTS = ["timm", "timm_compile", "triton", "cuda"]
# The LSA and GSA module cases also time mmsegmentation's modules (``mmseg``: its code, with timm's
# weights; benchmarks/mmseg_standins.py), the baseline of a user patching an mmsegmentation backbone
ATTENTION_VARIANTS = [*VARIANTS, "mmseg"]
# FLOPs of an attention forward+backward over its forward's: the backward's five matmuls (scores
# recomputed, dV, dP, dQ, dK) to the forward's two, as FlashAttention counts them
ATTENTION_FWDBWD_FLOPS = 3.5


# The cases a GPU session times first (`-m headline`): for each speed target of the op and patch issues,
# the case it names or, where it names a range, its first shape (SVT-S stage 1 at 224, the 512 padding
# case for LSA, the SVT-S backbone at 512). A session has 15 minutes of device time, and the whole suite
# (622 cases, 148 of them compiling a baseline anew) takes several times that. Also the sub-sampling
# comparison the GSA issue asks for (its fused kernel against timm's conv + LayerNorm) at its first shape.
HEADLINE_PREFIXES = (
    "peg-fwd-svt_s-stage1-224-", "peg-fwdbwd-svt_s-stage1-224-",
    "lsa-fwd-svt_s-stage1-224-", "lsa-fwdbwd-svt_s-stage1-224-",
    "lsa-fwd-svt_s-stage1-512-", "lsa-fwdbwd-svt_s-stage1-512-",
    "lsa-core-fwd-svt_s-stage1-224-", "lsa-core-fwd-svt_s-stage1-512-", "lsa-core-fwdbwd-svt_s-stage1-224-",
    "gsa-fwd-svt_s-stage1-224-", "gsa-fwdbwd-svt_s-stage1-224-",
    "gsa-fwd-pcpvt_s-stage1-224-", "gsa-fwdbwd-pcpvt_s-stage1-224-",
    "gsa-core-sr1-fwd-svt_s-28x28-", "gsa-core-sr1-fwdbwd-svt_s-28x28-",
    "gsa-subsample-fwd-pcpvt_s-stage1-224-",
    "model-twins_svt_small-infer-224-", "model-twins_pcpvt_small-infer-224-",
    "model-twins_svt_small-backbone-512-", "model-twins_svt_small-train-224-",
)
# Run order: every case that compiles nothing first (cheapest op first), then those that compile a
# baseline (tens of seconds each, a model's minutes), so that a run stopped at its deadline has every
# eager comparison and as many compiled ones as it had time for.
FAMILY_ORDER = ("peg", "lsa-core", "lsa", "gsa-core", "gsa-subsample", "gsa", "model")
# The families whose case ids name a part of an op ("lsa-core-fwd-...") rather than the op's module
OP_PARTS = ("core", "subsample")


def pytest_addoption(parser):
    parser.addoption("--skip-timed", action="append", default=[], metavar="JSON",
                     help="skip the cases this pytest-benchmark JSON already holds timings of (a later device "
                          "call goes on where an earlier one stopped); may be given more than once")
    parser.addoption("--profile-case", metavar="ID",
                     help="run only the case of this id, one call of it between the CUDA profiler's start and "
                          "stop, untimed: what `ncu --profile-from-start off` profiles (run_gpu.sh profile)")


def pytest_configure(config):
    config.addinivalue_line("markers", "headline: the cases a GPU session times first (HEADLINE_PREFIXES)")
    # Dynamo compiles a function for at most recompile_limit (8) sets of guards and then runs it eager,
    # with a warning: timm's forward (or a model's) compiled for case after case would turn every later
    # "compile" column into eager timings. The cases compile with a clean cache (``compiled``), and
    # hitting the limit anyway is an error rather than a mislabelled number.
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def case_id(item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec else item.name


def family_of(case: str) -> str:
    """The op family of a case id ("lsa", "lsa-core", "gsa-subsample", "model", ...): the ``op`` its
    benchmark records."""
    parts = case.split("-")
    return "-".join(parts[:2]) if len(parts) > 1 and parts[1] in OP_PARTS else parts[0]


def compiles(case: str) -> bool:
    return case.endswith("_compile")


def timed_cases(paths: list[str]) -> set[str]:
    """The ids of the cases that have a recorded timing in these pytest-benchmark JSON files."""
    done = set()
    for path in paths:
        with open(path) as f:
            for bench in json.load(f).get("benchmarks", []):
                if "median_ms" in bench.get("extra_info", {}) and bench.get("param"):
                    done.add(bench["param"])
    return done


def pytest_collection_modifyitems(config, items):
    for item in items:
        if case_id(item).startswith(HEADLINE_PREFIXES):
            item.add_marker(pytest.mark.headline)
    profiled = config.getoption("--profile-case")
    if profiled:
        chosen = [item for item in items if case_id(item) == profiled]
        if not chosen:
            raise pytest.UsageError(f"--profile-case {profiled}: no benchmark case has that id")
        config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
        items[:] = chosen
    done = timed_cases(config.getoption("--skip-timed"))
    if done:
        config.hook.pytest_deselected(items=[item for item in items if case_id(item) in done])
        items[:] = [item for item in items if case_id(item) not in done]
    rank = {family: i for i, family in enumerate(FAMILY_ORDER)}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (compiles(case_id(item)), rank.get(family_of(case_id(item)), len(rank)),
                                 position[id(item)]))


def compiled(fn, **compile_kwargs):
    """``torch.compile(fn)`` with Dynamo's caches cleared first, so earlier cases' compilations of the
    same code count nothing towards its recompile limit."""
    torch._dynamo.reset()
    return torch.compile(fn, **compile_kwargs)


def build_variant(variant: str, timm_module, fused_cls):
    """The module a benchmark variant runs: timm eager, timm under torch.compile, mmsegmentation's
    counterpart eager (with the timm module's weights), or the fused module (sharing the timm module's
    parameters) on the named backend; skips a backend that cannot run."""
    import copy

    if variant == "timm":
        return timm_module
    if variant == "timm_compile":
        return compiled(copy.deepcopy(timm_module))
    if variant == "mmseg":
        from mmseg_standins import from_timm

        return from_timm(timm_module)
    skip_unless_available(variant)
    return fused_cls.from_module(timm_module, backend=variant)


def skip_unless_available(backend: str):
    """Skip the calling benchmark, with the reason, unless ``backend`` can run on CUDA tensors here."""
    from twins_kernels.backend import backend_status

    status = backend_status(backend, "cuda")
    if not status.available:
        pytest.skip(status.reason)


def timed_pass(module, x, size, pass_: str, leaves=()):
    """A callable running the forward (no grad) or forward+backward of ``module`` on ``x``. The backward
    writes fresh gradients of x, of ``leaves`` (other tensors the call reads that require grad) and of
    the module's parameters, as a training step after ``zero_grad()`` does: accumulated into the
    previous call's, each would cost another read and write of its size in the timing."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                module(x, size)
        return run
    x.requires_grad_(True)
    out = module(x, size)
    grad = torch.randn_like(out)
    del out
    grad_leaves = [x, *leaves, *(module.parameters() if isinstance(module, torch.nn.Module) else ())]

    def run():
        for leaf in grad_leaves:
            leaf.grad = None
        module(x, size).backward(grad)
    return run


def median_ms(fn, min_runs: int = 20) -> float:
    """The CUDA-event median of ``fn`` over at least 100 ms of runs and at least ``min_runs`` of them:
    do_bench sizes its runs to its ``rep`` milliseconds, which for a whole model's 50-100 ms call would
    be one or two."""
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=max(100.0, min_runs * start.elapsed_time(end)),
                                   return_mode="median")


@pytest.fixture(scope="session")
def roofline(request):
    """The device's measured ceilings: copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s; with
    --profile-case, none (nothing is timed) and ``profile`` set, which ``record`` reads."""
    if not HAS_GPU:
        pytest.skip("no CUDA GPU is visible")
    if request.config.getoption("--profile-case"):
        return {"profile": True, "device": torch.cuda.get_device_name()}
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_tflops = 2 * n**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12
    return {"copy_gbs": copy_gbs, "bf16_matmul_tflops": matmul_tflops, "device": torch.cuda.get_device_name()}


def conv_backward_flop_by_groups(grad_out_shape, x_shape, w_shape, *args, out_shape, **kwargs) -> int:
    """PyTorch's FLOP count of a convolution's backward, with the weight gradient's divided by the groups:
    torch (2.11 to 2.14) counts every weight gradient as a dense conv's, every input channel against every
    output channel: C times the work of PEG's depthwise conv, which put 4-5% too many FLOPs on a Twins
    training step."""
    from torch.utils.flop_counter import conv_backward_flop

    *conv_args, groups, output_mask = args

    def part(mask):
        return conv_backward_flop(grad_out_shape, x_shape, w_shape, *conv_args, groups, mask, out_val=out_shape)

    return part([output_mask[0], False, False]) + part([False, output_mask[1], False]) // groups


def flop_counter():
    """PyTorch's FlopCounterMode, counting grouped (depthwise) convolutions' backward right."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop_by_groups})


def roofline_floor(roofline, bytes_moved: float, flops: float) -> tuple[float, str]:
    """The fewest milliseconds a case can take on this device (its bytes at the copy bandwidth, or its
    FLOPs at the bf16 matmul rate, whichever is longer) and which of the two bounds it ("memory" or
    "compute")."""
    memory_ms = bytes_moved / (roofline["copy_gbs"] * 1e9) * 1e3
    compute_ms = flops / (roofline["bf16_matmul_tflops"] * 1e12) * 1e3
    return max(memory_ms, compute_ms), "memory" if memory_ms >= compute_ms else "compute"


def record(benchmark, fn, roofline, *, bytes_moved: float, flops: float = 0.0, **info):
    """Time ``fn`` (pytest-benchmark + CUDA-event median) and record throughput against the roofline:
    % of the copy bandwidth, and % of the roofline (the floor over the time: 100 = as fast as the
    device allows for the bytes and FLOPs counted), with the bound (the whole models count FLOPs only:
    their % is of the matmul rate)."""
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    if roofline.get("profile"):
        return profiled_call(benchmark, fn, bytes_moved=bytes_moved, flops=flops, device=roofline["device"], **info)
    # Peak memory of one call on its own: do_bench allocates a 256 MiB buffer to flush L2 between runs,
    # which a peak taken over the timing would count.
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_mib = torch.cuda.max_memory_allocated() / 2**20
    ms = median_ms(fn)

    def synchronized():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=30, iterations=1, warmup_rounds=5)
    gbs = bytes_moved / (ms * 1e-3) / 1e9
    floor_ms, bound = roofline_floor(roofline, bytes_moved, flops)
    if floor_ms > 0:
        benchmark.extra_info.update(pct_roofline=100.0 * floor_ms / ms, bound=bound)
    benchmark.extra_info.update(
        median_ms=ms,
        bytes_moved=bytes_moved,
        flops=flops,
        achieved_gbs=gbs,
        achieved_tflops=flops / (ms * 1e-3) / 1e12,
        pct_copy_bandwidth=100.0 * gbs / roofline["copy_gbs"],
        copy_gbs=roofline["copy_gbs"],
        bf16_matmul_tflops=roofline["bf16_matmul_tflops"],
        peak_memory_mib=peak_mib,
        device=roofline["device"],
        **info,
    )
    return ms


def profiled_call(benchmark, fn, **info) -> float:
    """One call of ``fn`` between the CUDA profiler's start and stop, all that `ncu --profile-from-start off`
    profiles, untimed (NaN); ``extra_info`` keeps what the case counts, which benchmarks/profile_report.py
    sets the kernels' DRAM traffic against."""
    def profiled():
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()

    benchmark.pedantic(profiled, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(profiled=True, **info)
    return float("nan")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and device in the JSON's header, for the report."""
    machine_info["torch_version"] = torch.__version__
    try:
        import triton

        machine_info["triton_version"] = triton.__version__
    except ImportError:
        machine_info["triton_version"] = "not installed"
    import timm  # every case's baseline is timm's module, whose code varies by release

    machine_info["timm_version"] = timm.__version__
    machine_info["gpu"] = torch.cuda.get_device_name() if HAS_GPU else "none"
