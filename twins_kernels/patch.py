"""Swap the fused modules into existing models, in place, and back.

    report = twins_kernels.patch_model(model)          # every timm LSA / GSA / PEG in the tree
    print(report)                                      # what was replaced, what was left alone and why
    twins_kernels.unpatch_model(model)                 # the original modules again
    with twins_kernels.patched(model, backend="cuda"):  # both, around a block
        ...

A fused module shares its parameters (the very same submodules) with the module it replaces, so
state_dict keys and values are unchanged: checkpoints load into a patched model and a patched model's
checkpoints load into an unpatched one. Patching works before or after ``.to(device, dtype)`` and
on any module tree: a timm Twins model, a ``features_only`` backbone, a model inside another module
or inside DistributedDataParallel.

mmsegmentation's Twins modules are replaced too, once ``mmseg.models.backbones.twins`` is imported
(see ``twins_kernels.mmseg``). Other Twins implementations plug in with ``register_patch(cls, kind,
converter)``: ``converter(module, backend)`` returns the fused replacement (or raises ``PatchSkip``
with the reason to leave it alone). The README shows a worked example for the original Twins
repository's ``PosCNN``.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from .backend import check_backend_choice

KINDS = ("lsa", "gsa", "peg")
_ORIGINAL = "_twins_kernels_original"  # where a fused module keeps the module it replaced


class PatchSkip(Exception):
    """Raised by a converter to leave a module alone; the message is the reason, shown in the report."""


@dataclass(frozen=True)
class _Registration:
    kind: str
    converter: Callable[[nn.Module, str | None], nn.Module]


_registry: dict[type, _Registration] = {}
_builtins_registered = False
_mmseg_registered = False


def register_patch(cls: type, kind: str, converter: Callable[[nn.Module, str | None], nn.Module]) -> None:
    """Patch instances of ``cls`` (exactly that class, not subclasses) as op ``kind`` ("lsa", "gsa" or
    "peg") with ``converter(module, backend)``, which must return a module with the same forward
    signature that shares ``module``'s parameters."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _registry[cls] = _Registration(kind, converter)


def _convert_posconv(module: nn.Module, backend: str | None) -> nn.Module:
    from .modules import FusedPEG

    conv = module.proj[0]
    if module.stride != 1:
        raise PatchSkip(f"stride {module.stride}: only stride 1 is fused (timm's own path is as fast)")
    if conv.in_channels != conv.out_channels:
        raise PatchSkip(f"in_chans {conv.in_channels} != embed_dim {conv.out_channels}: only depthwise is fused")
    return FusedPEG.from_module(module, backend=backend)


def _register_builtins() -> None:
    """timm's classes, registered on first use so that importing twins_kernels never needs timm, and
    mmsegmentation's on the first use after its twins module is imported (never importing it: that pulls
    in mmcv); a user's ``register_patch`` of one of them, made before, stays. Each flag is set once all its
    classes are in: a thread that patches meanwhile registers them too (the same entries), never patching
    with a part."""
    global _builtins_registered, _mmseg_registered
    if not _builtins_registered:
        _register_timm_classes()
        _builtins_registered = True
    if not _mmseg_registered:
        from . import mmseg

        module = sys.modules.get(mmseg.MODULE)
        if module is not None:
            for name, (kind, converter) in mmseg.CONVERTERS.items():
                cls = getattr(module, name, None)
                if cls is not None:
                    _registry.setdefault(cls, _Registration(kind, converter))
            _mmseg_registered = True


def _register_timm_classes() -> None:
    try:
        from timm.models import twins
    except ImportError:
        return
    from timm.models import register_notrace_module  # timm.layers has it only from 1.0.17 on

    from .modules import FusedGSA, FusedLSA, FusedPEG

    for cls, kind, converter in [
        (twins.PosConv, "peg", _convert_posconv),
        (twins.LocallyGroupedAttn, "lsa", FusedLSA.from_module),
        (twins.GlobalSubSampleAttn, "gsa", FusedGSA.from_module),
    ]:
        _registry.setdefault(cls, _Registration(kind, converter))
    # timm's FX feature extraction (create_feature_extractor, features_only="fx") keeps these as calls:
    # their input checks and kernel launches cannot be traced symbolically
    for cls in (FusedLSA, FusedGSA, FusedPEG):
        register_notrace_module(cls)


# nn.Module's hook registries: a fused module takes over those of the module it replaces
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _take_over_hooks(original: nn.Module, fused: nn.Module) -> None:
    """Give ``fused`` the hooks registered on ``original``: the very same dicts where ``fused`` has none of
    its own, so that a hook registered on either while patched runs on both and its handle removes it
    from both; where a converter's module has hooks of its own, ``original``'s are added to them."""
    for name in _HOOK_DICTS:
        hooks = original.__dict__.get(name)
        if hooks is None:
            continue
        if fused.__dict__.get(name):
            fused.__dict__[name].update(hooks)
        else:
            fused.__dict__[name] = hooks
    fused._is_full_backward_hook = original._is_full_backward_hook


@dataclass
class PatchReport:
    """What ``patch_model`` did: counts of replaced modules per kind, and the ones it left alone."""

    replaced: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (qualified name, reason)
    notes: list[str] = field(default_factory=list)
    # the fused modules this call put in: what ``patched`` takes out again, and nothing else
    inserted: list[nn.Module] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        counts = ", ".join(f"{self.replaced[k]} {k}" for k in KINDS if self.replaced[k]) or "nothing"
        lines = [f"replaced: {counts}"]
        lines += [f"left alone: {name}: {reason}" for name, reason in self.skipped]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _named_children(model: nn.Module):
    """(parent, attribute name, qualified name, child) for every child of every module in the tree, a
    module held under several names once per name (named_children would give it once)."""
    for parent_name, parent in model.named_modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, f"{parent_name}.{name}" if parent_name else name, child


def _note_unpatchable(model: nn.Module, ops: tuple[str, ...], report: "PatchReport") -> None:
    """Report, rather than pass over in silence, the modules of the kinds in ``ops`` that patching
    cannot replace: the root itself (it has no parent to hold its replacement) and instances of a
    subclass of a registered class (its forward may differ from the class's)."""
    for qualified, module in model.named_modules():
        registration = _registry.get(type(module))
        if registration is not None:
            if module is model and registration.kind in ops:
                report.skipped.append(("(the model itself)", f"a registered {type(module).__name__} at the "
                                       f"root has no parent to hold its replacement: patch the module that "
                                       f"holds it, or use its fused class's from_module"))
            continue
        for cls, registration in _registry.items():
            if isinstance(module, cls) and registration.kind in ops:
                report.skipped.append((qualified or "(the model itself)",
                                       f"{type(module).__name__} subclasses {cls.__name__}, whose forward it may "
                                       f"change: register_patch({type(module).__name__}, ...) to patch it"))
                break


def patch_model(model: nn.Module, backend: str | None = None, ops: Iterable[str] = KINDS) -> PatchReport:
    """Replace, in place, every registered module of the kinds in ``ops`` by its fused counterpart.

    ``backend`` is fixed on each fused module (None: the ambient choice at call time, see
    ``twins_kernels.backend``). Returns a report; calling it again on a patched model changes nothing.
    """
    _register_builtins()
    backend = check_backend_choice(backend, "patch_model(backend=...)")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = set(ops) - set(KINDS)
    if unknown:
        raise ValueError(f"ops must be drawn from {KINDS}, got {sorted(unknown)}")
    report = PatchReport()
    _note_unpatchable(model, ops, report)
    fused_for = {}  # id of a module held under several names -> its one replacement
    for parent, name, qualified, child in list(_named_children(model)):
        registration = _registry.get(type(child))
        if registration is None or registration.kind not in ops:
            continue
        if id(child) in fused_for:
            setattr(parent, name, fused_for[id(child)])
            continue
        try:
            fused = registration.converter(child, backend)
        except PatchSkip as reason:
            report.skipped.append((qualified, str(reason)))
            continue
        fused.train(child.training)
        _take_over_hooks(child, fused)
        # outside nn.Module's registry: not a submodule, so no duplicate state_dict keys
        fused.__dict__[_ORIGINAL] = child
        fused_for[id(child)] = fused
        setattr(parent, name, fused)
        report.replaced[registration.kind] += 1
        report.inserted.append(fused)
        dropout = getattr(fused, "attention_dropout", 0.0)
        if dropout > 0:
            report.notes.append(f"{qualified}: attn_drop={dropout} runs the reference path in training mode")
    return report


def unpatch_model(model: nn.Module, only: Iterable[nn.Module] | None = None) -> int:
    """Put back every module ``patch_model`` replaced (or those whose fused modules are in ``only``, as a
    report's ``inserted``); returns how many."""
    chosen = None if only is None else {id(module) for module in only}
    restored = set()
    for parent, name, _, child in list(_named_children(model)):
        original = child.__dict__.get(_ORIGINAL)
        if original is not None and (chosen is None or id(child) in chosen):
            original.train(child.training)
            # the hook dicts are shared already; a full backward hook registered while patched set the flag
            original._is_full_backward_hook = child._is_full_backward_hook
            setattr(parent, name, original)
            restored.add(id(child))
    return len(restored)


@contextlib.contextmanager
def patched(model: nn.Module, backend: str | None = None, ops: Iterable[str] = KINDS):
    """Patch ``model`` for the ``with`` block (yielding the report), and unpatch afterwards what it
    patched: on a model patched before, the modules fused then stay."""
    report = patch_model(model, backend=backend, ops=ops)
    try:
        yield report
    finally:
        unpatch_model(model, only=report.inserted)
