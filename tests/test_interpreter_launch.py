"""twins_kernels.ops._triton's mend of the Triton interpreter's launches: the language is patched once per
launch rather than at every call of a @triton.jit helper, and the kernels compute what they did."""
import os

import pytest
import torch

from twins_kernels import FusedLSA

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
