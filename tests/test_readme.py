"""The README's code, run as it is written there (with the few substitutions each test names: no
weights can be downloaded, and on a machine without a GPU the tensors stay on the CPU), and its table of
functional ops, checked against the ops' real signatures: a user copies from the README first."""
import ast
import inspect
import re

import timm
import torch
from timm.models.twins import LocallyGroupedAttn

import twins_kernels
from twins_kernels import ops

from conftest import HAS_GPU, ROOT, readme_python_block, skip_unless_available

README = open(f"{ROOT}/README.md").read()


def substituted(code: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in code, f"the README's block no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def documented_signatures() -> dict[str, tuple[list[str], dict]]:
    """The functional ops' table: name -> (parameter names, defaults), parsed as Python."""
    rows = re.findall(r"^\| `(\w+)\((.*)\)` \|", README, re.M)
    documented = {}
    for name, parameters in rows:
        args = ast.parse(f"def {name}({parameters}): pass").body[0].args
        names = [arg.arg for arg in args.args]
        defaults = dict(zip(names[len(names) - len(args.defaults):], map(ast.literal_eval, args.defaults)))
        documented[name] = (names, defaults)
    return documented


def test_the_table_of_functional_ops_states_their_signatures():
    documented = documented_signatures()
    assert set(documented) == set(ops.__all__) & set(twins_kernels.__all__)  # the references are not public
    for name, (names, defaults) in documented.items():
        parameters = inspect.signature(getattr(ops, name)).parameters.values()
        assert names == [p.name for p in parameters], name
        assert defaults == {p.name: p.default for p in parameters if p.default is not p.empty}, name


def test_the_use_example_runs():
    code = readme_python_block("from twins_kernels import FusedGSA, FusedLSA, FusedPEG, use_backend")
    if HAS_GPU:
        skip_unless_available("cuda")
    else:  # the reference backend on CPU tensors, in place of the GPU and the cuda backend
        code = substituted(code, {'device="cuda"': 'device="cpu"', ".cuda()": "", 'use_backend("cuda")':
                                  'use_backend("torch")'})
    namespace = {"timm_block": type("Block", (), {"attn": LocallyGroupedAttn(64, 2, ws=7)})}
    exec(code, namespace)
    assert namespace["y"].shape == (8, 56 * 56, 64) and namespace["y"].dtype == torch.bfloat16
    assert namespace["fused"].qkv is namespace["timm_block"].attn.qkv
    assert namespace["masked"].pad_mode == "mask"


def test_the_patching_example_runs_and_prints_what_it_says(capsys):
    code = readme_python_block("report = twins_kernels.patch_model(model)")
    substitutions = {"pretrained=True": "pretrained=False"}
    if HAS_GPU:
        skip_unless_available("cuda")
    else:
        substitutions |= {".cuda()": "", 'backend="cuda"': 'backend="torch"'}
    namespace = {"images": torch.randn(1, 3, 64, 64, device="cuda" if HAS_GPU else "cpu", dtype=torch.bfloat16)}
    exec(substituted(code, substitutions), namespace)
    printed = re.search(r'print\(report\)\s+# "(.*)"', code).group(1)
    assert capsys.readouterr().out.strip() == printed
    model = namespace["model"]
    assert not any(isinstance(m, (twins_kernels.FusedLSA, twins_kernels.FusedGSA, twins_kernels.FusedPEG))
                   for m in model.modules()), "the with-block unpatches the model"
    assert namespace["logits"].shape == (1, model.num_classes)

