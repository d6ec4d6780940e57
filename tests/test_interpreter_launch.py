"""twins_kernels.ops._triton's mends of the Triton interpreter's launches: the language is patched once per
launch rather than at every call of a @triton.jit helper, no overflow check is built that nothing asserts,
NumPy dtypes are looked up once a type, and the kernels compute what they did."""
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from twins_kernels import FusedGSA, FusedLSA, FusedPEG
from twins_kernels.ops._triton import _skip_unasserted_overflow_checks

from parity import make_tokens

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def forward_and_backward(module, x, size):
    x = x.detach().requires_grad_()
    out = module(x, size)
    out.backward(torch.ones_like(out))
    return [out, x.grad, *(param.grad for param in module.parameters())]


def test_a_launch_patches_the_language_as_often_for_four_programs_as_for_twelve(monkeypatch):
    """The LSA kernels call helpers in every program (tl.zeros, the scale, the softmax delta): patched at
    each call, one image's launches would patch the language fewer times than three images'."""
    from triton.runtime import interpreter

    patches = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *args: (patches.append(args[0]), patch_builtin(*args)))
    module = FusedLSA(32, num_heads=1, ws=7, backend="triton")
    counts = []
    for batch in [3, 1, 3]:  # four windows an image, one head: a program each (the first run: warm-up)
        patches.clear()
        forward_and_backward(module, make_tokens(batch, 14, 14, 32, torch.float32, "cpu"), (14, 14))
        counts.append(len(patches))
    assert counts[1] == counts[2] > 0, counts


def test_the_kernels_compute_what_they_compute_with_the_interpreters_own_launch(monkeypatch):
    from triton.runtime import interpreter

    module = FusedLSA(32, num_heads=2, ws=7, backend="triton")
    x = make_tokens(2, 9, 10, 32, torch.float32, "cpu")
    mended = forward_and_backward(module, x, (9, 10))
    module.zero_grad(set_to_none=True)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreter.GridExecutor.__call__.__wrapped__)
    own = forward_and_backward(module, x, (9, 10))
    assert all(torch.equal(a, b) for a, b in zip(mended, own))


def ops_forward_and_backward():
    """Each op's kernels, forward and backward, in fp32 and fp16 (16-bit index arithmetic is the same)."""
    results = []
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        for module in (FusedLSA(32, 2, ws=7, backend="triton"), FusedGSA(32, 2, sr_ratio=2, backend="triton"),
                       FusedPEG(32, 32, backend="triton")):
            results += forward_and_backward(module.to(dtype), make_tokens(2, 9, 10, 32, dtype, "cpu"), (9, 10))
    return results


def test_no_overflow_check_is_built_and_the_kernels_compute_what_they_did_with_them(monkeypatch):
    """The interpreter hands its overflow checks to device_assert, which drops them without ``debug``: with
    the mend none reaches it, and the kernels' outputs and gradients are bitwise those computed with the
    checks built."""
    from triton.language.semantic import TritonSemantic
    from triton.runtime import interpreter

    asserted = []  # the messages of what reaches device_assert (self, cond, msg, mask)
    device_assert = TritonSemantic.device_assert
    monkeypatch.setattr(TritonSemantic, "device_assert",
                        lambda *args: (asserted.append(args[2]), device_assert(*args))[1])
    mended = ops_forward_and_backward()
    assert not asserted, asserted[:3]
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=True))
    checked = ops_forward_and_backward()
    assert any("overflow" in message for message in asserted), "the checks were not built: is the spy stale?"
    assert all(torch.equal(a, b) for a, b in zip(mended, checked, strict=True))


def test_overflow_checks_stay_where_debug_asserts_them():
    options = SimpleNamespace(debug=True, sanitize_overflow=True)
    interpreter = SimpleNamespace(interpreter_builder=SimpleNamespace(options=options))
    _skip_unasserted_overflow_checks(interpreter)
    assert interpreter.interpreter_builder.options is options


def test_numpy_dtypes_looked_up_once_are_the_tables(monkeypatch):
    """Each Triton type's NumPy dtype, kept by the type's name, is the one the interpreter's table gives:
    element types, pointers, blocks of each (equal names, equal dtypes); and the kernels compute what they
    compute with the table built at every look-up."""
    import triton.language as tl
    from triton.runtime import interpreter

    kept = interpreter._get_np_dtype
    table = kept.__wrapped__
    scalars = [tl.int1, tl.int32, tl.int64, tl.float16, tl.bfloat16, tl.float32, tl.float64]
    types = scalars + [tl.pointer_type(t) for t in scalars]
    types += [tl.block_type(t, [4, 2]) for t in types]
    assert [kept(t) for t in types] == [table(t) for t in types] == [kept(t) for t in types]
    cached = ops_forward_and_backward()
    monkeypatch.setattr(interpreter, "_get_np_dtype", table)
    rebuilt = ops_forward_and_backward()
    assert all(torch.equal(a, b) for a, b in zip(cached, rebuilt, strict=True))
