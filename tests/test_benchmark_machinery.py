"""The benchmarks' torch.compile baselines stay compiled case after case (checked on CPU: Dynamo's
recompile limit is the same on every device), every case's body runs (on the CPU, untimed), and a GPU
session's selection of cases (`-m headline`, `--skip-timed`) and their order are the ones it plans on."""
import itertools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from twins_kernels import FusedLSA

from conftest import HAS_GPU, ROOT, SHALLOW, load_benchmarks_module
from parity import DTYPE_IDS, assert_rel_close, make_tokens


class Scaled(torch.nn.Module):
    """Each instance is a new compilation: Dynamo specializes on an int attribute of a module."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor + 1


def run_cases(compile_fn, cases: int):
    x = torch.randn(4)
    for factor in range(cases):
        torch.testing.assert_close(compile_fn(Scaled(factor))(x), x * factor + 1)


def test_compiled_baselines_never_run_eager_past_the_recompile_limit():
    bench = load_benchmarks_module("conftest.py")
    cases = torch._dynamo.config.recompile_limit + 2
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False):
        bench.pytest_configure(SimpleNamespace(addinivalue_line=lambda *line: None))  # what the benchmark session sets
        run_cases(lambda module: bench.compiled(module, backend="eager"), cases)
        # the same cases compiled into one cache reach the limit; the session's setting makes that an
        # error instead of an eager run reported as compiled
        torch._dynamo.reset()
        with pytest.raises(Exception, match="recompile_limit"):
            run_cases(lambda module: torch.compile(module, backend="eager"), cases)
    torch._dynamo.reset()


def test_a_runs_json_names_the_versions_its_report_shows(tmp_path):
    """The benchmark session writes torch's, Triton's and timm's versions (every baseline is timm's module,
    whose code varies by release) into the JSON, where the report reads its header from."""
    import triton

    machine_info = {}
    load_benchmarks_module("conftest.py").pytest_benchmark_update_machine_info(None, machine_info)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": machine_info, "benchmarks": []}))
    _, header = load_benchmarks_module("report.py").load_run(str(path))
    assert (header["torch"], header["triton"], header["timm"]) == (torch.__version__, triton.__version__,
                                                                   timm.__version__)


class BenchmarkFixture:
    """pytest-benchmark's ``benchmark`` as the cases use it: a group, extra_info, and pedantic runs."""

    def __init__(self):
        self.group, self.extra_info = None, {}

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        fn()


@pytest.fixture
def benchmarks_on_cpu(monkeypatch):
    """The benchmark modules, their cases' bodies made runnable on the CPU: tensors on the CPU and a
    64-pixel image at batch 1, the models with two blocks a stage (each kind of block, at less than half
    of Dynamo's tracing time), the GPU timers and memory counters stubbed (each runs the case once),
    torch.compile on Dynamo's eager backend, the triton backend in the interpreter."""
    if HAS_GPU:
        pytest.skip("a GPU is present: `pytest benchmarks/` runs the cases themselves")
    bench = load_benchmarks_module("conftest.py")
    monkeypatch.setitem(sys.modules, "conftest", bench)  # what the benchmark modules import by that name
    monkeypatch.setitem(sys.modules, "mmseg_standins", load_benchmarks_module("mmseg_standins.py"))
    modules = {name: load_benchmarks_module(f"test_bench_{name}.py") for name in ("lsa", "gsa", "peg", "models")}

    real_compiled = bench.compiled

    def compiled(fn, **compile_kwargs):  # the cases' own compile, on Dynamo's backend that runs eager
        return real_compiled(fn, **compile_kwargs, backend="eager")

    monkeypatch.setattr(bench, "median_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    shallow_timm = SimpleNamespace(create_model=lambda name, **kwargs: timm.create_model(name, depths=SHALLOW,
                                                                                         **kwargs))
    monkeypatch.setattr(modules["models"], "timm", shallow_timm)
    for module in (bench, *modules.values()):
        for name, value in (("DEVICE", "cpu"), ("IMAGE_SIZES", {64: 1}), ("compiled", compiled),
                            ("skip_unless_available", lambda backend: None)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    return modules


ROOFLINE = {"copy_gbs": 1.0, "bf16_matmul_tflops": 1.0, "device": "cpu"}
TARGETS = load_benchmarks_module("report.py").TARGETS  # the speed targets the report judges cases by
OP_VARIANTS = ("timm", "timm_compile", "triton")  # cuda: the extension runs on the GPU only
ATTENTION_VARIANTS = (*OP_VARIANTS, "mmseg")


def run_case(case, *args) -> dict:
    benchmark = BenchmarkFixture()
    case(benchmark, ROOFLINE, *args)
    info = benchmark.extra_info
    assert benchmark.group and info["median_ms"] == 1.0, info
    # every case counts its bytes and FLOPs: a floor at the roofline (1 GB/s, 1 TFLOP/s here)
    floor_ms = max(info["bytes_moved"] / 1e6, info["flops"] / 1e9)
    assert info["pct_roofline"] == pytest.approx(100 * floor_ms) and info["bound"] in ("memory", "compute")
    if info["op"] == "model":  # FLOPs counted, bytes not
        assert info["flops"] > 0 and info["bound"] == "compute"
    for target in TARGETS:  # the fields the report judges the case by
        if target.where["op"] == info["op"]:
            assert set(target.where) <= set(info), (target.text, info)
    return info


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_op_benchmark_cases_run(benchmarks_on_cpu, pass_):
    """Every op benchmark's body, once per variant, at a stage with padded LSA windows and sr = 4 and at
    the sr = 1 stage: the GPU session's first run of them is not where a typo should surface."""
    lsa, gsa, peg = (benchmarks_on_cpu[name] for name in ("lsa", "gsa", "peg"))
    for variant in OP_VARIANTS:
        run_case(peg.test_peg, 64, 1, pass_, variant)
    for variant in ATTENTION_VARIANTS:
        run_case(lsa.test_lsa_module, 64, 1, pass_, variant)
        for model, stage in itertools.product(gsa.MODELS, (1, 3)):
            info = run_case(gsa.test_gsa_module, model, 64, stage, pass_, variant)
            assert info["variant"] == variant and info["achieved_gbs"] > 0
    run_case(lsa.test_lsa_attention_core, 64, 1, pass_, "triton")
    for variant in ("sdpa", "triton"):
        run_case(gsa.test_gsa_sr1_attention_core, 64, pass_, variant)
    for variant in gsa.SUBSAMPLE_VARIANTS:
        for stage in (0, 2):  # sr = 8 on a 16x16 map, sr = 2 at C = 320 on a 4x4 one
            info = run_case(gsa.test_gsa_subsample, 64, stage, pass_, variant)
            assert info["op"] == "gsa-subsample" and info["achieved_gbs"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("height,width", [(14, 14), (14, 10), (9, 13)])  # padded nowhere, at the right, both sides
def test_the_mmseg_variant_is_the_cases_function_in_mmsegmentations_code(dtype, height, width):
    """The ``mmseg`` variant carries the case's timm module's weights into mmsegmentation's layout (q and
    kv packed in one in_proj, proj as out_proj): its GSA computes timm's, at sr 1 and 4, its residual
    zero; its LSA computes FusedLSA's ``pad_mode="mmseg"`` (timm's own where the map is not padded on
    both sides). On the modules' dtype, in eval mode as the cases run them."""
    from_timm = load_benchmarks_module("mmseg_standins.py").from_timm
    x = make_tokens(2, height, width, 32, dtype, "cpu")
    lsa = LocallyGroupedAttn(32, 2, ws=7).to(dtype).eval()
    modules = [(lsa, FusedLSA.from_module(lsa, backend="torch", pad_mode="mmseg"))]
    modules += [(gsa, gsa) for gsa in (GlobalSubSampleAttn(32, 2, sr_ratio=sr).to(dtype).eval() for sr in (1, 4))]
    with torch.no_grad():
        for timm_module, expected in modules:
            mmseg, size = from_timm(timm_module), (height, width)
            assert not mmseg.training and {p.dtype for p in mmseg.parameters()} == {dtype}
            assert_rel_close(mmseg(x, size), expected(x, size), dtype, type(timm_module).__name__)


@pytest.mark.parametrize("mode", ["infer", "backbone", "train"])
def test_model_benchmark_cases_run(benchmarks_on_cpu, mode):
    for variant in benchmarks_on_cpu["models"].VARIANTS:
        info = run_case(benchmarks_on_cpu["models"].test_model, "twins_svt_small", mode, 64, 1, variant)
        assert info["images_per_s"] == 1 / 1e-3


def test_record_reports_throughput_against_the_roofline(benchmarks_on_cpu, monkeypatch):
    bench = sys.modules["conftest"]  # the benchmarks' conftest, as benchmarks_on_cpu stubbed it
    monkeypatch.setattr(bench, "median_ms", lambda fn: 4.0)
    roofline = {"copy_gbs": 2000.0, "bf16_matmul_tflops": 1000.0, "device": "test"}

    def recorded(bytes_moved, flops):
        benchmark = BenchmarkFixture()
        assert bench.record(benchmark, lambda: None, roofline, bytes_moved=bytes_moved, flops=flops) == 4.0
        return benchmark.extra_info

    info = recorded(2e9, 5e11)  # floors: 1 ms at 2000 GB/s, 0.5 ms at 1000 TFLOP/s; timed: 4 ms
    assert info["achieved_gbs"] == pytest.approx(500) and info["pct_copy_bandwidth"] == pytest.approx(25)
    assert info["achieved_tflops"] == pytest.approx(125)
    assert info["pct_roofline"] == pytest.approx(25) and info["bound"] == "memory"
    info = recorded(2e9, 4e12)  # 4 ms of FLOPs: as fast as the device allows
    assert info["pct_roofline"] == pytest.approx(100) and info["bound"] == "compute"
    assert "pct_roofline" not in recorded(0.0, 0.0), "nothing counted, no floor"


@pytest.mark.parametrize("op", ["peg", "lsa", "gsa", "gsa-subsample"])
def test_counted_flops_are_what_timms_modules_compute(benchmarks_on_cpu, monkeypatch, op):
    """The FLOPs a case counts (its roofline's compute floor, its TFLOP/s) are those PyTorch's FLOP counter
    finds in timm's module at the case's shape, at every stage: at batch 2 and 224² (maps that LSA's
    windows and GSA's sub-sampling divide: timm would compute padded queries too), attention on SDPA's
    math path (the counter sees its matmuls). Forward only for the attention modules, whose forward+backward
    counts flash's recomputation (timm's autograd does not recompute). The counter is the benchmarks' own,
    which the model cases count with: PyTorch's took PEG's depthwise weight gradient for a dense conv's
    (65x the forward's FLOPs at C = 64, where a depthwise conv's backward has 2x)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = []
    lsa, gsa, peg = (benchmarks_on_cpu[name] for name in ("lsa", "gsa", "peg"))
    for module in (lsa, gsa, peg):
        monkeypatch.setattr(module, "IMAGE_SIZES", {224: 2})
        monkeypatch.setattr(module, "record", lambda benchmark, fn, roofline, **counts: calls.append((fn, counts)))
    cases = {"peg": [(peg.test_peg, (224, stage, pass_)) for stage in range(4) for pass_ in ("fwd", "fwdbwd")],
             "lsa": [(lsa.test_lsa_module, (224, stage, "fwd")) for stage in range(4)],
             "gsa": [(gsa.test_gsa_module, (model, 224, stage, "fwd")) for model in gsa.MODELS for stage in range(4)],
             "gsa-subsample": [(gsa.test_gsa_subsample, (224, stage, pass_)) for stage in range(3)
                               for pass_ in ("fwd", "fwdbwd")]}[op]
    for case, args in cases:
        case(BenchmarkFixture(), ROOFLINE, *args, "timm")
        run, counts = calls.pop()
        with benchmarks_on_cpu["models"].flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
            run()
        assert counts["flops"] == counter.get_total_flops(), (case.__name__, args)


class BytesAtOpBoundaries(TorchDispatchMode):
    """The bytes the ops a call dispatches move in ``dtype``, each tensor argument read and each result
    written once per op, as the memory carries them where nothing is fused across those ops; views move
    nothing. Activations are the tensors laid out over the batch: batch first, or one dimension the
    batch's ``rows`` (tokens or keys) flattened, as the Linears' 2-D GEMMs and their transposes take
    them. The rest are weights and their gradients, summed apart by shape. ``unread`` names, per op,
    arguments its kernels are handed but do not read."""

    def __init__(self, dtype: torch.dtype, batch: int, rows, unread):
        super().__init__()
        self.dtype, self.batch, self.rows, self.unread = dtype, batch, set(rows), unread
        self.activations, self.weights = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(returned.alias_info is not None for returned in func._schema.returns):
            return result
        unread = self.unread.get(str(func.overloadpacket), ())
        read = [arg for arg, schema in zip(args, func._schema.arguments) if schema.name not in unread]
        for tensor in tree_flatten((read, kwargs, result))[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != self.dtype:
                continue
            size = tensor.numel() * tensor.element_size()
            if tensor.shape[0] == self.batch or self.rows & set(tensor.shape):
                self.activations += size
            else:
                self.weights[tuple(tensor.shape)] = self.weights.get(tuple(tensor.shape), 0) + size
        return result


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", ["peg", "lsa", "lsa-core", "gsa", "gsa-core", "gsa-subsample"])
def test_counted_bytes_are_what_the_fused_module_moves_between_its_ops(benchmarks_on_cpu, monkeypatch, op, pass_):
    """The bytes a case counts (its roofline's memory floor, its GB/s) are those the fused module or op
    moves in bf16 between the ops it dispatches (the Linears' GEMMs and bias sums, the package's ops, the
    sum of two gradients of one tensor), forward and forward+backward, at batch 2 and 224², every stage:
    a perfect kernel for each op reads its inputs once and writes its outputs once. Left out, as the
    cases leave them out: the weights and their gradients (but for the sub-sampling alone, whose count
    has its conv weight, read by the forward and the backward, and its gradient), the fp32 tensors the
    ops keep for their backward, and LSA's ``out``, which the backward op is handed but the triton
    kernels do not read (delta comes from the probabilities). The torch backend dispatches the same
    ops as the kernel backends."""
    calls = []
    lsa, gsa, peg = (benchmarks_on_cpu[name] for name in ("lsa", "gsa", "peg"))
    real_timed_pass = sys.modules["conftest"].timed_pass

    def timed_pass(module, x, size, pass_, leaves=()):
        return real_timed_pass(module, x, size, pass_, leaves), x

    for module in (lsa, gsa, peg):
        monkeypatch.setattr(module, "IMAGE_SIZES", {224: 2})
        monkeypatch.setattr(module, "timed_pass", timed_pass)
        monkeypatch.setattr(module, "record", lambda benchmark, run, roofline, **counts: calls.append((run, counts)))
    cases = {"peg": [(peg.test_peg, (224, stage, pass_, "torch")) for stage in range(4)],
             "lsa": [(lsa.test_lsa_module, (224, stage, pass_, "torch")) for stage in range(4)],
             "lsa-core": [(lsa.test_lsa_attention_core, (224, stage, pass_, "torch")) for stage in range(4)],
             "gsa": [(gsa.test_gsa_module, (model, 224, stage, pass_, "torch")) for model in gsa.MODELS
                     for stage in range(4)],
             "gsa-core": [(gsa.test_gsa_sr1_attention_core, (224, pass_, "torch"))],
             "gsa-subsample": [(gsa.test_gsa_subsample, (224, stage, pass_, "triton")) for stage in range(3)]}[op]
    for case, args in cases:
        case(BenchmarkFixture(), ROOFLINE, *args)
        (run, x), counts = calls.pop()
        batch, tokens, _ = x.shape
        rows = [batch * tokens // sr**2 for sr in (1, 2, 4, 8) if tokens % sr**2 == 0]  # tokens, keys
        with BytesAtOpBoundaries(x.dtype, batch, rows, {"twins_kernels.lsa_backward": ("out",)}) as moved:
            run()
        conv_weights = [size for shape, size in moved.weights.items() if len(shape) == 4]
        conv_weight = sum(conv_weights) if op == "gsa-subsample" else 0
        assert counts["bytes_moved"] == moved.activations + conv_weight, (case.__name__, args)


def collected_cases(*args) -> list[str]:
    """The benchmark case ids `pytest benchmarks/ ARGS` would run, in order."""
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q",
                             "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines() if "::" in line]


def test_headline_cases_cover_each_prefix_and_run_compiles_last(tmp_path):
    """`-m headline` selects, for every prefix, its cases in every variant; every case that compiles a
    baseline comes after all that do not, the cheaper ops first; `--skip-timed` drops the cases an
    earlier run's JSON has timings of, and only those."""
    bench = load_benchmarks_module("conftest.py")
    headline = collected_cases("-m", "headline")
    for prefix in bench.HEADLINE_PREFIXES:
        variants = sorted(case.rsplit("-", 1)[1] for case in headline if case.startswith(prefix))
        if prefix.startswith("model-"):
            assert variants == ["patched", "patched_compile", "timm", "timm_compile"], prefix
        elif "-core-" in prefix:
            assert {"triton", "cuda"} <= set(variants), prefix
        elif "-subsample-" in prefix:
            assert variants == ["timm", "timm_compile", "triton"], prefix
        elif prefix.startswith("peg-"):
            assert variants == ["cuda", "timm", "timm_compile", "triton"], prefix
        else:  # the LSA and GSA modules
            assert variants == ["cuda", "mmseg", "timm", "timm_compile", "triton"], prefix
    assert all(case.startswith(bench.HEADLINE_PREFIXES) for case in headline)
    assert {bench.family_of(case) for case in headline} == set(bench.FAMILY_ORDER)  # "lsa-core" too, not "lsa"
    order = [(bench.compiles(case), bench.FAMILY_ORDER.index(bench.family_of(case))) for case in headline]
    assert order == sorted(order) and order[0] == (False, 0) and order[-1] == (True, len(bench.FAMILY_ORDER) - 1)

    earlier = tmp_path / "earlier.json"
    done, interrupted = headline[:5], headline[5]
    earlier.write_text(json.dumps({"benchmarks": [{"param": case, "extra_info": {"median_ms": 1.0}} for case in done]
                                   + [{"param": interrupted, "extra_info": {}}]}))
    assert collected_cases("-m", "headline", "--skip-timed", str(earlier)) == headline[5:]


def test_profile_case_runs_that_case_alone_and_refuses_an_unknown_one():
    case = "gsa-core-sr1-fwdbwd-svt_s-28x28-bs64-bf16-cuda"
    assert collected_cases("--profile-case", case) == [case]
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-p",
                             "no:cacheprovider", "--profile-case", "gsa-core-sr2"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "--profile-case gsa-core-sr2: no benchmark case has that id" in result.stderr


def test_a_profiled_case_is_one_call_inside_the_profiler_range_untimed(benchmarks_on_cpu, monkeypatch):
    """What `ncu --profile-from-start off` sees of a case: its call once, after the call that compiles
    (outside), synchronized before the range ends; what the case counts is kept for the profile's report."""
    bench = sys.modules["conftest"]  # the benchmarks' conftest, as benchmarks_on_cpu stubbed it
    events = []
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: events.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: events.append("stop"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(bench, "median_ms", lambda fn: pytest.fail("a profiled case is not timed"))
    benchmark = BenchmarkFixture()
    ms = bench.record(benchmark, lambda: events.append("call"), {"profile": True, "device": "test"},
                      bytes_moved=1e6, flops=2e6, op="peg")
    assert math.isnan(ms) and events == ["call", "sync", "start", "call", "sync", "stop"]
    assert benchmark.extra_info == {"profiled": True, "bytes_moved": 1e6, "flops": 2e6, "device": "test", "op": "peg"}


def test_targets_name_values_the_cases_record(monkeypatch):
    """Each speed target's conditions are values the benchmark cases are parametrized with, so that a
    misspelt one does not leave the target "not measured" after a GPU run."""
    bench = load_benchmarks_module("conftest.py")
    monkeypatch.setitem(sys.modules, "conftest", bench)  # what the benchmark modules import by that name
    models = load_benchmarks_module("test_bench_models.py")
    known = {"op": set(bench.FAMILY_ORDER), "pass_": {"fwd", "fwdbwd"} | {mode for mode, _, _ in models.MODES},
             "image": set(bench.IMAGE_SIZES) | {image for _, image, _ in models.MODES}, "model": set(models.MODELS)}
    for target in TARGETS:
        assert set(target.where) <= set(known), target.text
        for key, values in target.where.items():
            assert set(values if isinstance(values, tuple) else (values,)) <= known[key], (target.text, key)
        variants = set(models.VARIANTS if target.where["op"] == "model" else bench.VARIANTS)
        assert set(target.variants) <= variants, target.text
