"""Shared pytest fixtures."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

#: The most test processes ``-n auto`` starts.
MAX_WORKERS = 4


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the tests (unless OMP_NUM_THREADS says otherwise), in this
    process and the ones it starts (gloo ranks, torchrun, the CLI, notebook kernels).

    The tests' tensors are tiny, and on a 2-core machine two ranks with two threads each
    would oversubscribe it; a second thread gave no clear gain in total time (634 s
    against 635 s on the 2-core CI machine). The cores are used by running the tests in
    one process each instead (``-n auto``, :func:`pytest_xdist_auto_num_workers`). The
    tests assert what holds at any thread count.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one test process per core, at most ``MAX_WORKERS``.

    Each process imports torch and builds its own module fixtures, so past a few
    processes the suite gets no faster, only heavier on memory.
    """
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Save the torch, numpy and Python RNG states before each test and restore them after.

    A test that seeds or draws from a global generator cannot change what another test sees.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global state is what we guard)
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
