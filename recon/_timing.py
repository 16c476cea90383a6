"""A cheap per-phase wall clock for :func:`recon.prune` (read by ``recon bench``).

Phases nest: time spent in an inner phase is not counted in the outer one, so the
phases of a run add up to its wall time. Entering or leaving a phase costs two
``time.perf_counter`` calls, so the timer is always on.

On CUDA, kernels run asynchronously: without synchronisation a phase's kernels are
charged to whichever later phase waits for them (the totals stay right). Set
:data:`SYNCHRONIZE` to True (``recon bench`` does) to synchronise the device at every
phase change, for an exact breakdown at a small cost in speed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["PHASES", "SYNCHRONIZE", "PhaseTimer"]

#: The phases of a pruning run, in the order they are reported.
PHASES = ("forward", "stats", "select", "solve", "surgery", "other")

#: Synchronise CUDA at every phase change (exact per-phase times on a GPU).
SYNCHRONIZE = False


class PhaseTimer:
    """Exclusive wall time per named phase.

    Examples
    --------
    >>> timer = PhaseTimer()
    >>> with timer("forward"):
    ...     with timer("stats"):
    ...         pass
    >>> sorted(timer.seconds)
    ['forward', 'stats']
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = time.perf_counter()
        self._cuda = device is not None and torch.device(device).type == "cuda"

    def _switch(self) -> None:
        if self._cuda and SYNCHRONIZE:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    def push(self, name: str) -> None:
        """Enter phase ``name`` (inside the current one)."""
        self._switch()
        self._stack.append(name)

    def pop(self) -> None:
        """Leave the current phase."""
        self._switch()
        self._stack.pop()

    def swap(self, name: str) -> None:
        """Leave the current phase and enter ``name``."""
        self._switch()
        self._stack[-1] = name

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Charge the time until the block ends to phase ``name`` (minus inner phases)."""
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def report(self, total: float) -> dict[str, float]:
        """Seconds per phase in :data:`PHASES` order; ``"other"`` is ``total`` minus the rest."""
        out = {name: self.seconds.get(name, 0.0) for name in PHASES if name != "other"}
        for name, value in self.seconds.items():  # phases outside PHASES, if any
            out.setdefault(name, value)
        out["other"] = max(total - sum(out.values()), 0.0)
        return out
