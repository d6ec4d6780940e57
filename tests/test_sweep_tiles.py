"""benchmarks/sweep_tiles.py, the tile sweep a GPU session runs, checked in the interpreter at small
shapes with a stub timer: every sweep's pass reaches its tile function, every candidate runs on the
launchers, a candidate whose outputs are wrong is caught, and the table is written."""
import json
import sys

import pytest

from conftest import load_benchmarks_module


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.setitem(sys.modules, "conftest", load_benchmarks_module("conftest.py"))  # its timer's home
    return load_benchmarks_module("sweep_tiles.py")


def fake_timer(calls):
    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0 + 0.5 * (len(calls) % 2)  # the default 1.5 ms; candidates alternate 1.0 and 1.5
    return timer


def test_every_sweep_runs_its_candidates_on_the_launchers(sweep, monkeypatch, tmp_path):
    originals = {s.name: getattr(s.module, s.function) for s in sweep.SWEEPS}
    # two candidates of each sweep: the interpreter takes a while per launch
    small = [sweep.Sweep(**{**s.__dict__, "candidates": (s.candidates[0], s.candidates[-1])}) for s in sweep.SWEEPS]
    monkeypatch.setattr(sweep, "SWEEPS", small)
    calls = []
    assert sweep.main(["--shapes", "small", "--out", str(tmp_path)], timer=fake_timer(calls)) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    for s in small:
        mine = [r for r in rows if r["sweep"] == s.name]
        assert mine[0]["default"] and mine[0]["vs_default"] == 1.0, mine
        assert all(r["error"] == "" and r["ms"] in (1.0, 1.5) for r in mine), mine
        assert 2 <= len(mine) <= 3  # a candidate equal to the default tiles is not timed twice
        assert getattr(s.module, s.function) is originals[s.name]  # the tile function is restored
    table = (tmp_path / "sweep.md").read_text()
    assert "| lsa-fwd | svt_s-stage1 |" in table and "default" in table


def test_a_candidate_with_wrong_outputs_is_reported_not_timed(sweep):
    lsa_fwd = next(s for s in sweep.SWEEPS if s.name == "lsa-fwd")
    # 16 slots cannot hold a 7 x 7 window: most outputs are never written (poisoned: NaN)
    wrong = sweep.Sweep(**{**lsa_fwd.__dict__, "candidates": ({"slots": 16, "block_q": 16},)})
    calls = []
    rows = sweep.run_sweep(wrong, "small", "cpu", timer=fake_timer(calls))
    assert len(rows) == 2 and rows[1]["ms"] is None and "outputs differ" in rows[1]["error"], rows
    assert len(calls) == 1  # the default only
    with pytest.raises(ValueError, match="no field"):
        sweep._overrides(sweep.lsa_ops.lsa_tiles(7, 16, sweep.torch.bfloat16, backward=False), {"block_m": 64})


def test_candidates_the_static_check_found_spilling_are_listed_not_run(sweep, tmp_path):
    peg_conv = next(s for s in sweep.SWEEPS if s.name == "peg-conv")
    small = sweep.Sweep(**{**peg_conv.__dict__, "candidates": ({"block_w": 16}, {"block_w": 32})})
    default = sweep._describe(sweep.peg_ops.conv_tiles(32, 10))  # the small shape's C and W
    spilling = default.replace("block_w=16", "block_w=32")
    assert spilling != default
    static = tmp_path / "static.json"
    static.write_text(json.dumps({"rows": [
        {"sweep": "peg-conv", "tiles": default, "default": True, "problems": [], "stack": 0},
        {"sweep": "peg-conv", "tiles": spilling, "default": False, "problems": [], "stack": 48}]}))
    calls = []
    rows = sweep.run_sweep(small, "small", "cpu", timer=fake_timer(calls), unfit=sweep.unfit_tiles(str(static)))
    by_tiles = {r["tiles"]: r for r in rows}
    assert by_tiles[spilling]["ms"] is None and "spills 48 bytes" in by_tiles[spilling]["error"]
    assert len(calls) == len([r for r in rows if r["ms"] is not None])  # the spilling one never timed
