"""Time the Triton kernels' tile choices against alternatives, on the GPU, at the headline shapes.

    python benchmarks/sweep_tiles.py [--sweep NAME ...] [--out DIR] [--budget-s SECONDS]

Each sweep names a tile function the launchers call (``lsa.lsa_tiles``, ``gsa.attention_tiles``,
``gsa.subsample_tiles``, ``peg.conv_tiles``, ``peg.weight_grad_tiles``), one launcher pass at one
shape (SVT-S / PCPVT-S stage 1 at 224, batch 64, and the sr = 1 core at 28 x 28, as the headline
benchmarks; bf16), and candidate tiles around the function's own choice. A candidate's run has the
function return the candidate for the swept pass's calls; its outputs, written over NaN-poisoned
buffers, must match those of the function's own tiles (bf16 tolerance), and it is timed by CUDA-event
median (``median_ms``, as the benchmarks). A candidate that fails to compile or launch (shared memory,
registers) is listed with its error; so, untimed, is one that the compile-only check
(`tests/triton_aot.py --sweeps`, `make sweep-report`) found spilling (``--skip-static``).
``sweep.md`` lists each sweep fastest first, as a ratio to the function's own tiles: where a
candidate wins beyond the noise, change the tile function and write the prediction in NOTES.md first.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from twins_kernels.ops.common import poisoned_outputs
from twins_kernels.testing import rel_err

# the op modules (twins_kernels.ops's own names lsa and peg are the functional ops)
lsa_ops, gsa_ops, peg_ops = (importlib.import_module(f"twins_kernels.ops.{op}") for op in ("lsa", "gsa", "peg"))

# the benchmarks' timer: benchmarks/conftest.py, beside this script (the directory Python puts first on
# sys.path when it runs it; tests/triton_aot.py and the tests load that conftest under this name first)
from conftest import median_ms  # noqa: E402

TOLERANCE = 1e-2  # a candidate's outputs against the default tiles', relative (bf16)


@dataclass(frozen=True)
class Shape:
    batch: int
    height: int
    width: int
    chans: int
    heads: int = 1
    keys_side: int = 0  # the sr = 1 core: keys on a keys_side x keys_side map (0: sub-sampled, see sr)
    sr: int = 1


# The headline shapes, and the small ones the CPU check runs in the interpreter
SHAPES = {
    "headline": {"svt_s-stage1": Shape(64, 56, 56, 64, heads=2, sr=8),
                 "pcpvt_s-stage1": Shape(64, 56, 56, 64, heads=1, sr=8),
                 "svt_s-sr1-28x28": Shape(64, 28, 28, 512, heads=16, keys_side=28)},
    "small": {"svt_s-stage1": Shape(1, 9, 10, 32, heads=2, sr=4),
              "pcpvt_s-stage1": Shape(1, 9, 10, 32, heads=1, sr=4),
              "svt_s-sr1-28x28": Shape(1, 5, 5, 32, heads=2, keys_side=5)},
}


@dataclass(frozen=True)
class Sweep:
    name: str
    module: ModuleType
    function: str  # the tile function in module, patched for the candidates
    shape: str  # a SHAPES key
    backward: bool | None  # the calls the candidate replaces: the backward's, the forward's; None: all
    candidates: tuple[dict, ...]  # overrides of the default tiles' fields
    setup: Callable[[Shape, str], Callable[[], tuple]]  # (shape, device) -> the timed pass, returning outputs


def grid(**fields) -> tuple[dict, ...]:
    return tuple(dict(zip(fields, values)) for values in itertools.product(*fields.values()))


def _randn(*shape, device):
    return torch.randn(*shape, device=device, dtype=torch.bfloat16)


def _lsa_inputs(s: Shape, device):
    qkv = _randn(s.batch, s.height * s.width, 3 * s.chans, device=device)
    bias = _randn(3 * s.chans, device=device)
    return (qkv, bias), (s.height, s.width, 7, s.heads, (s.chans // s.heads) ** -0.5, False)


def _gsa_inputs(s: Shape, device):
    keys = s.keys_side ** 2 if s.keys_side else (s.height // s.sr) * (s.width // s.sr)
    q = _randn(s.batch, s.height * s.width, s.chans, device=device)
    kv = _randn(s.batch, keys, 2 * s.chans, device=device)
    return (q, kv), (s.heads, (s.chans // s.heads) ** -0.5)


def attention_pass(make_inputs, forward, backward, timed_backward: bool):
    """The setup of an attention launcher pair's forward (``forward(*inputs, *args)`` -> (out, lse)) or
    backward (``backward(grad_out, *inputs, out, lse, *args)``) pass."""
    def setup(s: Shape, device):
        inputs, args = make_inputs(s, device)
        if not timed_backward:
            return lambda: forward(*inputs, *args)
        out, lse = forward(*inputs, *args)
        grad_out = torch.randn_like(out)
        return lambda: backward(grad_out, *inputs, out, lse, *args)
    return setup


lsa_forward, lsa_backward = (attention_pass(_lsa_inputs, lsa_ops.lsa_forward_triton, lsa_ops.lsa_backward_triton, b)
                             for b in (False, True))
gsa_attention_forward, gsa_attention_backward = (
    attention_pass(_gsa_inputs, gsa_ops.gsa_attention_forward_triton, gsa_ops.gsa_attention_backward_triton, b)
    for b in (False, True))


def _subsample_inputs(s: Shape, device):
    x = _randn(s.batch, s.height * s.width, s.chans, device=device)
    params = (_randn(s.chans, s.chans, s.sr, s.sr, device=device) / (s.chans * s.sr), _randn(s.chans, device=device),
              1 + 0.1 * _randn(s.chans, device=device), _randn(s.chans, device=device))
    return x, params


def gsa_subsample_forward(s: Shape, device):
    x, (weight, bias, norm_weight, norm_bias) = _subsample_inputs(s, device)
    return lambda: gsa_ops.gsa_subsample_forward_triton(x, weight, bias, norm_weight, norm_bias, s.height, s.width,
                                                        s.sr, 1e-5)


def gsa_subsample_backward(s: Shape, device):
    x, (weight, bias, norm_weight, norm_bias) = _subsample_inputs(s, device)
    out, y, mean, rstd = gsa_ops.gsa_subsample_forward_triton(x, weight, bias, norm_weight, norm_bias, s.height,
                                                              s.width, s.sr, 1e-5)
    grad_out = torch.randn_like(out)
    return lambda: gsa_ops.gsa_subsample_backward_triton(grad_out, x, weight, norm_weight, y, mean, rstd, s.height,
                                                         s.width, s.sr)


def _peg_inputs(s: Shape, device):
    return _randn(s.batch, s.height * s.width, s.chans, device=device), _randn(s.chans, 1, 3, 3, device=device)


def peg_conv(s: Shape, device):
    x, weight = _peg_inputs(s, device)
    bias = _randn(s.chans, device=device)
    return lambda: (peg_ops.peg_conv3x3_triton(x, weight, bias, s.height, s.width),)


def peg_weight_grad(s: Shape, device):
    x, _ = _peg_inputs(s, device)
    grad_out = torch.randn_like(x)
    return lambda: (peg_ops.peg_weight_grad_triton(grad_out, x, s.height, s.width),)


# 16-bit LSA at ws = 7 is one 64-slot window a program; 32-slot blocks split it in two (the forward then
# loops over two key blocks, the backward adds its dq kernel)
LSA_CANDIDATES = grid(block_q=(64, 32), num_warps=(2, 4, 8), num_stages=(1, 2))
ATTENTION_FORWARD = grid(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
ATTENTION_BACKWARD = grid(block_m=(32, 64, 128), block_n=(32, 64), num_warps=(4, 8), num_stages=(1, 2, 3))
SUBSAMPLE = grid(block_r=(32, 64, 128), block_co=(64, 128), num_warps=(4, 8), num_stages=(2, 3))
PEG = grid(block_w=(16, 32, 64), block_c=(32, 64, 128), num_warps=(2, 4, 8))

SWEEPS = [
    Sweep("lsa-fwd", lsa_ops, "lsa_tiles", "svt_s-stage1", False, LSA_CANDIDATES, lsa_forward),
    Sweep("lsa-bwd", lsa_ops, "lsa_tiles", "svt_s-stage1", True, LSA_CANDIDATES, lsa_backward),
    Sweep("gsa-attention-fwd-sr8", gsa_ops, "attention_tiles", "svt_s-stage1", False, ATTENTION_FORWARD,
          gsa_attention_forward),
    Sweep("gsa-attention-fwd-sr1", gsa_ops, "attention_tiles", "svt_s-sr1-28x28", False, ATTENTION_FORWARD,
          gsa_attention_forward),
    Sweep("gsa-attention-fwd-sr8-hd64", gsa_ops, "attention_tiles", "pcpvt_s-stage1", False, ATTENTION_FORWARD,
          gsa_attention_forward),
    Sweep("gsa-attention-bwd-sr8", gsa_ops, "attention_tiles", "svt_s-stage1", True, ATTENTION_BACKWARD,
          gsa_attention_backward),
    Sweep("gsa-attention-bwd-sr1", gsa_ops, "attention_tiles", "svt_s-sr1-28x28", True, ATTENTION_BACKWARD,
          gsa_attention_backward),
    Sweep("gsa-subsample-fwd", gsa_ops, "subsample_tiles", "pcpvt_s-stage1", None, SUBSAMPLE, gsa_subsample_forward),
    Sweep("gsa-subsample-bwd", gsa_ops, "subsample_tiles", "pcpvt_s-stage1", None, SUBSAMPLE, gsa_subsample_backward),
    Sweep("peg-conv", peg_ops, "conv_tiles", "svt_s-stage1", None, PEG, peg_conv),
    Sweep("peg-weight-grad", peg_ops, "weight_grad_tiles", "svt_s-stage1", None, PEG, peg_weight_grad),
]


def _overrides(tiles, candidate: dict) -> dict:
    """The candidate as fields of the tiles' class (LSA's one block size sets both query and key blocks)."""
    fields = {f.name for f in dataclasses.fields(tiles)}
    overrides = dict(candidate)
    if "block_q" in overrides and "block_k" in fields:
        overrides["block_k"] = overrides["block_q"]
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{type(tiles).__name__} has no field {sorted(unknown)}")
    return overrides


@contextlib.contextmanager
def tiles_from(sweep: Sweep, candidate: dict | None):
    """The sweep's tile function returning ``candidate`` (None: its own choice) for the swept calls;
    ``chosen`` lists the tiles it returned to those calls."""
    original = getattr(sweep.module, sweep.function)
    chosen = []

    def patched(*args, **kwargs):
        tiles = original(*args, **kwargs)
        if sweep.backward is None or kwargs.get("backward") == sweep.backward:
            if candidate is not None:
                tiles = dataclasses.replace(tiles, **_overrides(tiles, candidate))
            chosen.append(tiles)
        return tiles

    setattr(sweep.module, sweep.function, patched)
    try:
        yield chosen
    finally:
        setattr(sweep.module, sweep.function, original)


def _describe(tiles) -> str:
    return " ".join(f"{f.name}={getattr(tiles, f.name)}" for f in dataclasses.fields(tiles))


def unfit_tiles(static_report: str | None) -> dict[tuple[str, str], str]:
    """(sweep, tiles) -> why not to time them: the candidates that `tests/triton_aot.py --sweeps` found
    spilling registers or not fitting (compiled for sm_90 without a GPU)."""
    if not static_report:
        return {}
    with open(static_report) as f:
        rows = json.load(f)["rows"]
    return {(r["sweep"], r["tiles"]): "; ".join(r["problems"]) or f"spills {r['stack']} bytes a thread"
            for r in rows if (r["problems"] or r["stack"]) and not r["default"]}


def run_sweep(sweep: Sweep, shapes: str, device: str, timer=median_ms, deadline: float = math.inf,
              unfit: dict[tuple[str, str], str] | None = None) -> list[dict]:
    """One row per candidate (the default first): tiles, median ms, ratio to the default, error.
    Candidates in ``unfit`` (see unfit_tiles) are listed, not run."""
    torch.manual_seed(0)
    run = sweep.setup(SHAPES[shapes][sweep.shape], device)
    with tiles_from(sweep, None) as chosen:
        reference = [t for t in run() if t.is_floating_point()]
        default_ms = timer(run)
    default_tiles = chosen[0]
    rows = [dict(sweep=sweep.name, shape=sweep.shape, tiles=_describe(default_tiles), default=True, ms=default_ms,
                 vs_default=1.0, error="")]
    seen = {rows[0]["tiles"]}
    for candidate in sweep.candidates:
        if time.monotonic() > deadline:
            break
        planned = _describe(dataclasses.replace(default_tiles, **_overrides(default_tiles, candidate)))
        if (sweep.name, planned) in (unfit or {}) and planned not in seen:
            seen.add(planned)
            rows.append(dict(sweep=sweep.name, shape=sweep.shape, tiles=planned, default=False, ms=None,
                             vs_default=None, error=f"not timed: {unfit[(sweep.name, planned)]} (static check)"))
            continue
        with tiles_from(sweep, candidate) as chosen:
            try:
                with poisoned_outputs():
                    outputs = [t for t in run() if t.is_floating_point()]
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001  (a tile that does not fit: recorded, not fatal)
                rows.append(dict(sweep=sweep.name, shape=sweep.shape, tiles=str(candidate), default=False, ms=None,
                                 vs_default=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            described = _describe(chosen[0])
            if described in seen:
                continue
            seen.add(described)
            worst = max(rel_err(a, b) for a, b in zip(outputs, reference))
            if not worst <= TOLERANCE:  # rel_err is inf for NaN or Inf
                rows.append(dict(sweep=sweep.name, shape=sweep.shape, tiles=described, default=False, ms=None,
                                 vs_default=None, error=f"outputs differ from the default tiles' by {worst:.2e}"))
                continue
            ms = timer(run)
        rows.append(dict(sweep=sweep.name, shape=sweep.shape, tiles=described, default=False, ms=ms,
                         vs_default=default_ms / ms, error=""))
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| sweep | shape | tiles | median ms | speed vs default | note |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    by_sweep: dict[str, list[dict]] = {}
    for row in rows:
        by_sweep.setdefault(row["sweep"], []).append(row)
    for sweep_rows in by_sweep.values():
        timed = sorted((r for r in sweep_rows if r["ms"] is not None), key=lambda r: r["ms"])
        for r in timed + [r for r in sweep_rows if r["ms"] is None]:
            ms = f"{r['ms']:.4f}" if r["ms"] is not None else "–"
            ratio = f"{r['vs_default']:.2f}×" if r["vs_default"] is not None else "–"
            note = "default" if r["default"] else r["error"]
            lines.append(f"| {r['sweep']} | {r['shape']} | {r['tiles']} | {ms} | {ratio} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None, timer=median_ms) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="append", choices=[s.name for s in SWEEPS],
                        help="run only these sweeps (default: all, in the order listed)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="stop starting candidates after this many seconds (what is done is written)")
    parser.add_argument("--skip-static", metavar="JSON",
                        help="skip the candidates this `tests/triton_aot.py --sweeps --json` report found spilling "
                             "or not fitting (benchmarks/results/sweep_static.json)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="headline",
                        help="'small' is the CPU check's (tests/test_sweep_tiles.py), in the interpreter")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and timer is median_ms:
        print("no CUDA GPU: the sweep times GPU kernels (tests/test_sweep_tiles.py runs it on the CPU, in "
              "Triton's interpreter, with a stub timer)")
        return 1
    deadline = time.monotonic() + args.budget_s
    unfit = unfit_tiles(args.skip_static)
    rows = []
    for sweep in SWEEPS:
        if args.sweep and sweep.name not in args.sweep:
            continue
        if time.monotonic() > deadline:
            print(f"{sweep.name}: not run, out of time")
            continue
        rows.extend(run_sweep(sweep, args.shapes, device, timer, deadline, unfit))
        print(f"{sweep.name}: {sum(r['sweep'] == sweep.name for r in rows)} tiles tried", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    import triton

    header = (f"Tile sweep on {name}; torch {torch.__version__}, triton {triton.__version__}; "
              f"{time.strftime('%Y-%m-%d')}; bf16; shapes: {args.shapes}. Medians of CUDA-event timings.")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    table = markdown(rows, header)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
