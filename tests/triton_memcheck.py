"""Cross-program races and out-of-bounds accesses of Triton kernels, found in the interpreter.

The interpreter (``TRITON_INTERPRET=1``) runs a launch's programs one after another on host memory, so
two kinds of kernel bug pass every parity test on the CPU and break on a GPU:
- races: programs that write the same bytes (without atomics), or one reading bytes another writes,
  give the same answer on every CPU run; on a GPU the programs run concurrently, in no set order;
- out-of-bounds accesses: a load past a tensor's end reads whatever the host heap holds there (and a
  ``tl.where`` may then discard it), where a GPU faults with an illegal address or reads another
  allocation.
Inside ``record_accesses()`` every masked load and store of every program is logged (the bytes it
touches, masked-off lanes excluded), and at the end of each launch any byte written by two programs,
written by one and read by another, or outside every tensor argument's storage is a hazard. Atomics are
not logged: none of this project's kernels use them (reductions write per-program partials that the
host sums), so any hazard is a bug.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Hazard:
    kernel: str
    kind: str  # "write/write", "read/write", "out-of-bounds read" or "out-of-bounds write"
    argument: str  # whose memory (races), or the argument whose storage ends nearest below (out of bounds)
    bytes: int
    programs: tuple  # an example: the two programs (grid indices) touching one byte, or the one out of bounds

    def __str__(self) -> str:
        return f"{self.kernel}: {self.kind} of {self.bytes} bytes ({self.argument}), e.g. programs {self.programs}"


@dataclass
class AccessReport:
    launches: dict = field(default_factory=dict)  # kernel name -> launches seen
    hazards: list = field(default_factory=list)


def _bytes(addresses: np.ndarray, item_size: int) -> np.ndarray:
    """Every byte address the elements starting at ``addresses`` cover, unique."""
    return np.unique((addresses.astype(np.uint64)[:, None] + np.arange(item_size, dtype=np.uint64)).ravel())


class _Launch:
    """The bytes each program of one launch read and wrote, and the storages its tensor arguments hold."""

    def __init__(self, name: str, arguments: dict):
        self.name = name
        storages = {argument: tensor.untyped_storage() for argument, tensor in arguments.items()
                    if hasattr(tensor, "untyped_storage")}
        self.ranges = sorted((storage.data_ptr(), storage.nbytes(), argument) for argument, storage in storages.items())
        self.reads: dict[tuple, list] = {}
        self.writes: dict[tuple, list] = {}

    def log(self, accesses: dict, program: tuple, ptrs, mask) -> None:
        # astype: a mask combined with | or & can come as int32 0/1, which would index by position
        addresses = ptrs.data[np.broadcast_to(np.asarray(mask.data).astype(bool), ptrs.data.shape)]
        if addresses.size:
            item_size = ptrs.get_element_ty().primitive_bitwidth // 8
            accesses.setdefault(program, []).append(_bytes(addresses.ravel(), item_size))

    def argument(self, address: int) -> str:
        for start, size, name in self.ranges:
            if start <= address < start + size:
                return f"`{name}`"
        below = [(start + size, name) for start, size, name in self.ranges if start + size <= address]
        if below:
            end, name = max(below)
            return f"{address - end} bytes past the end of `{name}`"
        return "below every argument"

    def _flatten(self, accesses: dict, programs: list):
        """All (byte, program index) pairs of ``accesses``, sorted by byte."""
        index = {program: i for i, program in enumerate(programs)}
        parts = [np.unique(np.concatenate(chunks)) for chunks in accesses.values()]
        if not parts:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        owners = np.concatenate([np.full(part.size, index[program]) for program, part in zip(accesses, parts)])
        addresses = np.concatenate(parts)
        order = np.argsort(addresses, kind="stable")
        return addresses[order], owners[order]

    def hazards(self) -> list[Hazard]:
        programs = sorted(set(self.reads) | set(self.writes))
        written, writers = self._flatten(self.writes, programs)
        read, readers = self._flatten(self.reads, programs)
        found = []

        twice = np.flatnonzero(written[1:] == written[:-1])
        if twice.size:
            i = twice[0]
            found.append(Hazard(self.name, "write/write", self.argument(int(written[i])),
                                np.unique(written[twice]).size, (programs[writers[i]], programs[writers[i + 1]])))
        if written.size and read.size:
            at = np.minimum(np.searchsorted(written, read), written.size - 1)
            crossing = np.flatnonzero((written[at] == read) & (writers[at] != readers))
            if crossing.size:
                i = crossing[0]
                found.append(Hazard(self.name, "read/write", self.argument(int(read[i])),
                                    np.unique(read[crossing]).size, (programs[writers[at[i]]], programs[readers[i]])))
        for kind, addresses, owners in (("read", read, readers), ("write", written, writers)):
            inside = np.zeros(addresses.size, dtype=bool)
            for start, size, _ in self.ranges:
                inside |= (addresses >= start) & (addresses < start + size)
            outside = np.flatnonzero(~inside)
            if outside.size:
                i = outside[0]
                found.append(Hazard(self.name, f"out-of-bounds {kind}", self.argument(int(addresses[i])),
                                    np.unique(addresses[outside]).size, (programs[owners[i]],)))
        return found


@contextlib.contextmanager
def record_accesses():
    """Log every interpreted launch's loads and stores; yields an AccessReport filled in as launches end."""
    from triton.runtime import interpreter

    builder_class, executor_class = interpreter.InterpreterBuilder, interpreter.GridExecutor
    original_load, original_store = builder_class.create_masked_load, builder_class.create_masked_store
    original_call = executor_class.__call__
    report = AccessReport()
    current: list[_Launch] = []

    def load(self, ptrs, mask, *args, **kwargs):
        if current:
            current[-1].log(current[-1].reads, tuple(self.grid_idx), ptrs, mask)
        return original_load(self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        if current:
            current[-1].log(current[-1].writes, tuple(self.grid_idx), ptrs, mask)
        return original_store(self, ptrs, value, mask, *args, **kwargs)

    def call(self, *args, **kwargs):
        arguments = dict(zip(self.arg_names, args)) | kwargs
        current.append(_Launch(self.fn.__name__, arguments))
        try:
            return original_call(self, *args, **kwargs)
        finally:
            launch = current.pop()
            report.launches[launch.name] = report.launches.get(launch.name, 0) + 1
            report.hazards.extend(launch.hazards())

    builder_class.create_masked_load, builder_class.create_masked_store = load, store
    executor_class.__call__ = call
    try:
        yield report
    finally:
        builder_class.create_masked_load, builder_class.create_masked_store = original_load, original_store
        executor_class.__call__ = original_call
