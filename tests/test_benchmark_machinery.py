"""The benchmarks' torch.compile baselines stay compiled case after case (checked on CPU: Dynamo's
recompile limit is the same on every device)."""
import pytest
import torch

from conftest import load_benchmarks_module


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
        bench.pytest_configure(None)  # what the benchmark session sets
        run_cases(lambda module: bench.compiled(module, backend="eager"), cases)
        # the same cases compiled into one cache reach the limit; the session's setting makes that an
        # error instead of an eager run reported as compiled
        torch._dynamo.reset()
        with pytest.raises(Exception, match="recompile_limit"):
            run_cases(lambda module: torch.compile(module, backend="eager"), cases)
    torch._dynamo.reset()
