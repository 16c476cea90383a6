"""Run a function in several processes joined by a ``gloo`` process group (for tests).

``run_ranks(fn, world=2)`` spawns ``world`` fresh Python processes, each of which joins
a gloo group (rendezvous through a file, no network port), calls ``fn(rank, world,
*args)`` with one CPU thread, and sends back what it returned or the error it raised.
``fn`` must be importable (a module-level function of a test module or of this one).
The parent never waits longer than ``timeout`` seconds: processes still running then
are killed and reported as ``"timeout"``, so a test of a hang fails instead of hanging.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as _queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recon.distributed import leave_torchrun


@dataclass
class RankResult:
    """What one rank ended with: ``status`` is "ok", "error" or "timeout"."""

    rank: int
    status: str
    value: Any = None  # fn's return value ("ok") or the formatted exception ("error")


def _worker(rank, world, init_file, pg_timeout, fn, args, out) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        ok = False
        try:
            value = fn(rank, world, *args)
            ok = True
        finally:
            leave_torchrun(True, ok)
        buf = io.BytesIO()  # plain bytes: tensors in a queue would be shared memory that
        torch.save(value, buf)  # vanishes with this process
        out.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # sent back to the test, never swallowed
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        out.put((rank, "error", text))


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world: int = 2,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; one result per rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="recon-dist-")
    os.close(fd)
    os.remove(init_file)  # the FileStore creates it; a stale file would confuse it
    procs = [
        ctx.Process(target=_worker, args=(r, world, init_file, pg_timeout, fn, args, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=0.2)
                if status == "ok":
                    value = torch.load(io.BytesIO(value), weights_only=False)
                results[rank] = RankResult(rank, status, value)
            except _queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
        for r, p in enumerate(procs):
            if r not in results:
                if p.is_alive():
                    results[r] = RankResult(r, "timeout")
                else:
                    results[r] = RankResult(r, "error", f"exited with code {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        if os.path.exists(init_file):
            os.remove(init_file)
    return [results[r] for r in range(world)]


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's return value; an AssertionError with the ranks' errors otherwise."""
    bad = [r for r in results if r.status != "ok"]
    assert not bad, "\n".join(f"rank {r.rank}: {r.status}\n{r.value}" for r in bad)
    return [r.value for r in results]
