"""Cross-program data races of Triton kernels, found in the interpreter (``TRITON_INTERPRET=1``).

The interpreter runs a launch's programs one after another, so a kernel whose programs write the same
bytes (without atomics), or where one program reads bytes another writes, gives the same answer on
every CPU run, while on a GPU, where the programs run concurrently and in no set order, the answer
depends on which program got there first. Parity on the CPU cannot see such a bug; this recorder can:
inside ``record_races()``, every masked load and store of every program is logged (the bytes it
touches), and at the end of each launch any byte written by two programs, or written by one and read
by another, is a race. Atomics are not logged: none of this project's kernels use them (the
reductions write per-program partials that the host sums), so any racing byte is a bug.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Race:
    kernel: str
    kind: str  # "write/write" or "read/write"
    argument: str  # the kernel argument whose memory it is, or "?" when the address is in none
    racing_bytes: int
    programs: tuple  # an example: the two programs (grid indices) that touch the same byte

    def __str__(self) -> str:
        first, second = self.programs
        return (f"{self.kernel}: {self.kind} race on {self.racing_bytes} bytes of `{self.argument}`, "
                f"e.g. programs {first} and {second}")


@dataclass
class RaceReport:
    launches: dict = field(default_factory=dict)  # kernel name -> launches seen
    races: list = field(default_factory=list)


def _bytes(addresses: np.ndarray, item_size: int) -> np.ndarray:
    """Every byte address the elements starting at ``addresses`` cover, unique."""
    return np.unique((addresses.astype(np.uint64)[:, None] + np.arange(item_size, dtype=np.uint64)).ravel())


class _Launch:
    """The bytes each program of one launch read and wrote."""

    def __init__(self, name: str, arguments: dict):
        self.name = name
        storages = {argument: tensor.untyped_storage() for argument, tensor in arguments.items()
                    if hasattr(tensor, "untyped_storage")}
        self.ranges = [(argument, storage.data_ptr(), storage.nbytes()) for argument, storage in storages.items()]
        self.reads: dict[tuple, list] = {}
        self.writes: dict[tuple, list] = {}

    def log(self, accesses: dict, program: tuple, ptrs, mask) -> None:
        # astype: a mask combined with | or & can come as int32 0/1, which would index by position
        addresses = ptrs.data[np.broadcast_to(np.asarray(mask.data).astype(bool), ptrs.data.shape)]
        if addresses.size:
            item_size = ptrs.get_element_ty().primitive_bitwidth // 8
            accesses.setdefault(program, []).append(_bytes(addresses.ravel(), item_size))

    def argument(self, address: int) -> str:
        for name, start, size in self.ranges:
            if start <= address < start + size:
                return name
        return "?"

    def races(self) -> list[Race]:
        programs = sorted(set(self.reads) | set(self.writes))
        index = {program: i for i, program in enumerate(programs)}

        def flatten(accesses):
            parts = [np.unique(np.concatenate(chunks)) for chunks in accesses.values()]
            owners = [np.full(part.size, index[program]) for program, part in zip(accesses, parts)]
            if not parts:
                return np.empty(0, np.uint64), np.empty(0, np.int64)
            return np.concatenate(parts), np.concatenate(owners)

        found = []
        written, writers = flatten(self.writes)
        order = np.argsort(written, kind="stable")
        written, writers = written[order], writers[order]
        twice = np.flatnonzero(written[1:] == written[:-1])
        if twice.size:
            i = twice[0]
            found.append(Race(self.name, "write/write", self.argument(int(written[i])), np.unique(written[twice]).size,
                              (programs[writers[i]], programs[writers[i + 1]])))
        read, readers = flatten(self.reads)
        if written.size and read.size:
            at = np.minimum(np.searchsorted(written, read), written.size - 1)
            crossing = np.flatnonzero((written[at] == read) & (writers[at] != readers))
            if crossing.size:
                i = crossing[0]
                found.append(Race(self.name, "read/write", self.argument(int(read[i])), np.unique(read[crossing]).size,
                                  (programs[writers[at[i]]], programs[readers[i]])))
        return found


@contextlib.contextmanager
def record_races():
    """Log every interpreted launch's loads and stores; yields a RaceReport filled in as launches end."""
    from triton.runtime import interpreter

    builder_class, executor_class = interpreter.InterpreterBuilder, interpreter.GridExecutor
    original_load, original_store = builder_class.create_masked_load, builder_class.create_masked_store
    original_call = executor_class.__call__
    report = RaceReport()
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
            report.races.extend(launch.races())

    builder_class.create_masked_load, builder_class.create_masked_store = load, store
    executor_class.__call__ = call
    try:
        yield report
    finally:
        builder_class.create_masked_load, builder_class.create_masked_store = original_load, original_store
        executor_class.__call__ = original_call
