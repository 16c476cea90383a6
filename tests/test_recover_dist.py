"""recon.recover on two gloo ranks equals one process (each rank trains on its share)."""

from __future__ import annotations

import numpy as np
import torch
from _dist import run_ranks, values
from test_recover import _pair

import recon

ARGS = {"steps": 12, "batch_size": 20, "eval_every": 4, "seed": 3, "progress": False}


def _recover(rank: int, world: int, sharded: bool):
    original, pruned, x = _pair()
    if sharded:  # each rank is given only its own contiguous part
        x = x.tensor_split(world)[rank]
    out = recon.recover(pruned, original, x, calib_sharded=sharded, **ARGS)
    state = {k: v.detach().numpy().copy() for k, v in out.model.state_dict().items()}
    return state, out.report.best_step, out.report.error_after, out.report.images


def test_two_ranks_equal_one_process():
    original, pruned, x = _pair()
    one = recon.recover(pruned, original, x, **ARGS)
    for sharded in (False, True):
        ranks = values(run_ranks(_recover, sharded, world=2))
        (s0, step0, err0, n0), (s1, step1, _, _) = ranks
        assert step0 == step1 == one.report.best_step and n0 == one.report.images
        assert abs(err0 - one.report.error_after) <= 1e-5 * one.report.error_after
        for k, v in one.model.state_dict().items():
            assert np.array_equal(s0[k], s1[k])  # the ranks agree exactly (broadcast)
            torch.testing.assert_close(torch.from_numpy(s0[k]), v, rtol=1e-4, atol=1e-6)
