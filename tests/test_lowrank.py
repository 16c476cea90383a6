"""Pivoted Cholesky factors of Grams of few samples (recon.lowrank), known answers."""

from __future__ import annotations

import pytest
import torch

from recon.lowrank import pivoted_cholesky


def gram(N: int, d: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X


@pytest.mark.parametrize("block", [1, 4, 32])
@pytest.mark.parametrize(("N", "d"), [(5, 40), (30, 64), (64, 64)])
def test_factor_of_a_gram_of_n_samples_has_n_rows_and_reproduces_it(block, N, d):
    G = gram(N, d)
    tol = 1e-10 * float(G.diagonal().sum())
    F = pivoted_cholesky(G.__getitem__, G.diagonal(), max_rank=N + 8, tol=tol, block=block)
    assert F is not None and F.shape == (N, d)
    R = G - F.T @ F
    assert float(torch.linalg.matrix_norm(R, 2)) <= tol
    assert float(R.diagonal().min()) >= -1e-9 * float(G.diagonal().max())  # PSD residual


def test_too_few_rows_give_none_and_a_zero_gram_an_empty_factor():
    G = gram(20, 30)
    assert pivoted_cholesky(G.__getitem__, G.diagonal(), max_rank=10, tol=1e-9) is None
    Z = torch.zeros(6, 6, dtype=torch.float64)
    F = pivoted_cholesky(Z.__getitem__, Z.diagonal(), max_rank=3, tol=0.0)
    assert F is not None and F.shape == (0, 6)


def test_reads_only_the_rows_it_needs():
    G = gram(8, 200)
    asked = []
    F = pivoted_cholesky(
        lambda i: asked.append(len(i)) or G[i], G.diagonal(), max_rank=16, tol=1e-9, block=4
    )
    assert F is not None and F.shape[0] == 8
    assert sum(asked) <= 16  # a few blocks of candidate rows, not the 200 rows of G
