"""recon across processes with ``torch.distributed``: shards, summed statistics, failures.

Every quantity recon fits a layer from is a sum over calibration samples (see
:mod:`recon.stats`), so a run split over processes is exact: each rank accumulates the
sums of its shard of the images, the sums are all-reduced, and every rank solves the
same problem. Rank 0's choice of channels and its re-fitted weights are broadcast, so
all ranks' models stay identical bit for bit even where floating-point libraries
differ between machines.

Position sampling is seeded by the *global* index of each image (:mod:`recon.sampling`),
so the pruned model does not depend on the number of processes, up to the order of
floating-point summation.

Failures: before every collective the ranks exchange a one-integer-per-rank status
(:meth:`Context.check`). A rank whose work raised joins that exchange flagged, then
re-raises its own error; the others raise :class:`RankFailedError` naming it and its
error, instead of waiting for it forever. A rank that dies outright makes the others'
next collective fail (gloo and NCCL notice a closed connection, or the process
group's ``timeout`` ends the wait); that is raised as :class:`DistributedError`.

This module sees tensors and process groups; it knows nothing of layers or models.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Context",
    "DistributedError",
    "RankFailedError",
    "context",
    "join_torchrun",
    "leave_torchrun",
    "shard_range",
    "torchrun_world_size",
]


class DistributedError(RuntimeError):
    """A collective operation failed: another process most likely stopped or hung."""


class RankFailedError(RuntimeError):
    """Another rank raised an error; this rank stops too (the message says which and why)."""


def _available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``); 1 when unset or not an int."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join_torchrun(
    device: str | torch.device | None = None, timeout: float | None = None
) -> tuple[torch.device | None, bool]:
    """Join the process group that ``torchrun``'s environment describes, if any.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) with no group yet, initialise the default
    group: ``nccl`` when ``device`` is CUDA -- a device without an index becomes
    ``cuda:LOCAL_RANK``, and is made the current one -- ``gloo`` otherwise;
    ``timeout`` (seconds) bounds every wait for the other processes (torch's default
    if None). Outside ``torchrun``, or with a group already made, nothing changes.

    Returns
    -------
    device : torch.device or None
        ``device``, with the GPU index filled in.
    owned : bool
        Whether this call made the group (and the caller should destroy it).
    """
    dev = None if device is None else torch.device(device)
    if torchrun_world_size() <= 1 or not torch.distributed.is_available():
        return dev, False
    if torch.distributed.is_initialized():
        return dev, False
    cuda = dev is not None and dev.type == "cuda"
    if cuda:
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    torch.distributed.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return dev, True


def leave_torchrun(owned: bool, ok: bool = True) -> None:
    """Destroy the process group :func:`join_torchrun` made (``owned``), all ranks together.

    When this rank's work succeeded (``ok``), the ranks first meet at a barrier, so that
    none tears its gloo connections down while another still uses them: a rank that
    left early was seen to abort at exit ("terminate called without an active
    exception") in about one run in six. After a failure the barrier is skipped -- the
    other ranks may be gone -- and the group is destroyed at once.
    """
    if not owned or not torch.distributed.is_initialized():
        return
    if ok:
        with contextlib.suppress(Exception):  # a rank that died: nothing left to wait for
            torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The images ``[lo, hi)`` of ``rank`` when ``total`` are split in ``world`` contiguous parts.

    The first ``total % world`` ranks get one image more than the others.
    """
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class Context:
    """One pruning run's view of the process group.

    Attributes
    ----------
    rank, world : int
        This process's rank and the number of processes.
    device : torch.device
        Where collectives run: ``cuda`` for NCCL, the CPU otherwise.
    broken : bool
        Set once a collective has failed: no further collective is attempted.
    """

    rank: int
    world: int
    device: torch.device
    broken: bool = field(default=False)

    # ------------------------------------------------------------------ collectives

    def _collective(self, what: str, fn, *args, **kwargs):
        if self.broken:
            raise DistributedError(f"recon: no '{what}': an earlier collective failed")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # gloo/NCCL errors: closed connection, timeout
            self.broken = True
            raise DistributedError(
                f"recon (rank {self.rank} of {self.world}): the {what} across processes "
                f"failed ({type(exc).__name__}: {exc}). Another rank most likely crashed "
                "or stopped responding; its own output says why."
            ) from exc

    def check(self, where: str, error: BaseException | None = None) -> None:
        """Exchange every rank's status; raise :class:`RankFailedError` if another failed.

        Every rank must call this before each collective, and a failing rank calls it
        (with its ``error``) instead of the collective it will never reach, so that the
        calls always pair up.
        """
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = error is not None
        self._collective(f"status check ({where})", torch.distributed.all_reduce, flags)
        if not bool(flags.any()):
            return
        text = "" if error is None else f"{type(error).__name__}: {error}"
        messages: list[str | None] = [None] * self.world
        self._collective(
            f"error exchange ({where})", torch.distributed.all_gather_object, messages, text
        )
        if error is not None:
            return  # the caller re-raises its own error
        failed = [r for r in range(self.world) if flags[r]]
        lines = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailedError(
            f"recon (rank {self.rank} of {self.world}): stopped during {where} because "
            f"rank(s) {', '.join(map(str, failed))} failed -- {lines}"
        )

    def all_reduce_(self, tensors: Sequence[Tensor], where: str) -> None:
        """Sum ``tensors`` over ranks, in place, as one flat float64 buffer."""
        self.check(where)
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        self._collective(f"all-reduce ({where})", torch.distributed.all_reduce, flat)
        i = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[i : i + n].view_as(t))
            i += n

    def sum(self, values: Sequence[float], where: str) -> list[float]:
        """Sum a few numbers over ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        self.all_reduce_([t], where)
        return t.tolist()

    def broadcast_(self, t: Tensor, where: str) -> Tensor:
        """``t`` as rank 0 has it: copied into ``t`` in place on every rank, and returned.

        ``t`` must have the same shape and dtype on every rank.
        """
        self.check(where)
        buf = t.detach().to(self.device).contiguous()
        self._collective(f"broadcast ({where})", torch.distributed.broadcast, buf, 0)
        with torch.no_grad():
            t.copy_(buf)
        return t

    def gather_ints(self, values: Sequence[int], where: str) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank)."""
        self.check(where)
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective(f"all-gather ({where})", torch.distributed.all_gather, out, mine)
        return [o.tolist() for o in out]

    def same(self, values: Sequence[float], where: str, rtol: float = 1e-9) -> bool:
        """Whether every rank passed the same ``values``, to a relative ``rtol``.

        The tolerance lets machines that sum in a different order (other vector
        units) agree on what is the same model or data.
        """
        self.check(where)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        lo, hi = t.clone(), t.clone()
        op = torch.distributed.ReduceOp
        self._collective(f"comparison ({where})", torch.distributed.all_reduce, lo, op.MIN)
        self._collective(f"comparison ({where})", torch.distributed.all_reduce, hi, op.MAX)
        return bool(((hi - lo) <= rtol * torch.maximum(lo.abs(), hi.abs())).all())

    @contextlib.contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Run a block of work; if it raises, tell the other ranks before re-raising.

        Errors from a failed collective (:class:`DistributedError`) and errors another
        rank reported (:class:`RankFailedError`) are re-raised at once: every rank
        already knows.
        """
        try:
            yield
        except (DistributedError, RankFailedError):
            raise
        except BaseException as exc:
            if not self.broken:
                with contextlib.suppress(DistributedError):
                    self.check(where, error=exc)
            raise


def context(distributed: bool | None) -> Context | None:
    """The run's :class:`Context`, or None when it runs in one process.

    Parameters
    ----------
    distributed : bool or None
        None: use ``torch.distributed`` if its default process group is initialised
        with more than one process. True: require that (a ``ValueError`` otherwise).
        False: ignore it, every process prunes on its own.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(
            f"The 'distributed' argument must be a bool or None. Got {distributed!r} instead."
        )
    if distributed is False:
        return None
    if not _available():
        if distributed:
            raise ValueError(
                "The 'distributed' argument is True, but torch.distributed has no initialised "
                "process group: call torch.distributed.init_process_group() first (torchrun "
                "sets up the environment for it)."
            )
        return None
    world = torch.distributed.get_world_size()
    if world == 1:
        return None
    backend = str(torch.distributed.get_backend()).lower()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Context(rank=torch.distributed.get_rank(), world=world, device=device)
