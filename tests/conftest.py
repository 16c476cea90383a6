"""Shared pytest fixtures."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


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
