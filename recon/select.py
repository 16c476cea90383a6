"""Channel selection: which ``k`` of ``c`` input channels of a consumer to keep.

Every method returns the sorted indices of exactly ``k`` channels. The data-driven
methods work on the channel problem built from the sufficient statistics
(:func:`recon.stats.channel_gram`): ``A`` (c, c), the Gram of the per-channel
contributions ``Z_i`` to the consumer's output, and ``b`` (c,), their inner products
with the target ``Y``.

This module sees tensors only.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
import torch
from sklearn.linear_model import Lasso, lars_path_gram
from torch import Tensor

from .obs import removal_order, removal_order_shared

if TYPE_CHECKING:
    from .lowrank import Gram
    from .stats import ChannelStats, PatchStats

__all__ = [
    "METHODS",
    "SCORE_METHODS",
    "by_score",
    "channel_order",
    "first_k",
    "lasso",
    "lasso_coef",
    "lasso_order",
    "lasso_path",
    "obs",
    "obs_order",
    "random",
    "score_order",
    "select_channels",
    "thinet",
    "thinet_order",
]

METHODS = ("obs", "lasso", "thinet", "l1", "max_response", "apoz", "bn_gamma", "first_k", "random")
#: Methods that keep the channels with the largest per-channel scores (:mod:`recon.scores`):
#: the ones ``allocation="global"`` can rank across units.
SCORE_METHODS = ("l1", "max_response", "apoz", "bn_gamma")

#: Above this many channels, :func:`lasso` finds ``λ`` by bisection with coordinate
#: descent instead of following the LARS path, whose cost grows like ``c·k²``.
LARS_MAX_CHANNELS = 256
_BISECTION_STEPS = 60


def _check_k(k: int, c: int) -> None:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= c:
        raise ValueError(f"The 'k' argument must be an int in [1, {c}]. Got {k!r} instead.")


def _sorted(idx) -> Tensor:
    return torch.as_tensor(np.sort(np.asarray(idx, dtype=np.int64)))


def lasso_path(A: Tensor, b: Tensor, *, max_active: int | None = None):
    """The LASSO regularisation path of the channel problem.

    Solves, for every ``λ`` on the path,

    .. math::

        \\min_\\beta \\tfrac12 \\beta^\\top A \\beta - b^\\top \\beta
        + \\lambda \\|\\beta\\|_1,

    which is ``½‖Y − Σ_i β_i Z_i‖² + λ‖β‖₁`` up to a constant (He et al., 2017), with
    scikit-learn's LARS on the Gram form (:func:`sklearn.linear_model.lars_path_gram`).

    Returns
    -------
    alphas : ndarray, shape (n_alphas,)
        Decreasing values of ``λ``.
    coefs : ndarray, shape (c, n_alphas)
    """
    A64 = A.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    c = A64.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LARS warns on collinear/degenerate channels
        alphas, _, coefs = lars_path_gram(
            Xy=b64,
            Gram=A64,
            n_samples=1,
            method="lasso",
            max_iter=4 * c if max_active is None else 4 * max_active + 8,
        )
    return alphas, coefs


def lasso_coef(A: Tensor, b: Tensor, alpha: float) -> Tensor:
    """LASSO coefficients ``β`` at a given ``λ = alpha`` (objective as in :func:`lasso_path`)."""
    A64 = A.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, coefs = lars_path_gram(
            Xy=b64, Gram=A64, n_samples=1, method="lasso", alpha_min=float(alpha)
        )
    return torch.from_numpy(coefs[:, -1].copy())


def _fallback(A: Tensor, b: Tensor, beta: np.ndarray, k: int) -> Tensor:
    """The ``k`` largest ``|β|``; channels with ``β = 0`` ranked by ``|b_i| / sqrt(A_ii)``."""
    diag = np.clip(A.detach().double().cpu().numpy().diagonal(), 0, None)
    score = np.abs(b.detach().double().cpu().numpy()) / np.sqrt(diag + 1e-300)
    order = np.lexsort((-score, -np.abs(beta)))  # by |β| first, then by score
    return _sorted(order[:k])


def _lasso_lars(A: Tensor, b: Tensor, k: int) -> Tensor:
    _, coefs = lasso_path(A, b, max_active=k)
    nnz = (coefs != 0).sum(0)
    exact = np.flatnonzero(nnz == k)
    if exact.size:
        return _sorted(np.flatnonzero(coefs[:, exact[0]]))
    at_least = np.flatnonzero(nnz >= k)
    return _fallback(A, b, coefs[:, at_least[0]] if at_least.size else coefs[:, -1], k)


def _lasso_cd(A: Tensor, b: Tensor, k: int) -> Tensor:
    """Bisection on ``λ`` (geometric) with warm-started coordinate descent on the Gram.

    scikit-learn's ``Lasso`` minimises ``(1/2m)‖ỹ − X̃β‖² + α‖β‖₁``; with a square
    root ``X̃ᵀX̃ = A`` (Cholesky, ``m = c`` rows) and ``X̃ᵀỹ = b`` this is the channel
    problem divided by ``c``, so ``α = λ / c``.
    """
    A64 = A.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    c = len(b64)
    hi = float(np.abs(b64).max())  # at λ >= max|b| no channel is active
    if not hi > 0:
        return _fallback(A, b, np.zeros(c), k)
    L = _cholesky_psd(A64)
    X = np.ascontiguousarray(L.T)
    y = scipy.linalg.solve_triangular(L, b64, lower=True)
    # The Gram passed to coordinate descent is A itself: the jitter that lets the
    # Cholesky factor exist never acts as a ridge (which would split duplicate channels).
    est = Lasso(
        alpha=1.0,
        fit_intercept=False,
        precompute=np.ascontiguousarray(A64),
        warm_start=True,
        max_iter=5000,
        tol=1e-8,
    )

    def solve(lam: float) -> np.ndarray:
        est.set_params(alpha=lam / c)
        est.fit(X, y)
        return est.coef_.copy()

    # Walk down by decades from λ = max|b| (nothing active) until >= k are active.
    top = hi
    lo, beta_lo = hi, np.zeros(c)
    while (beta_lo != 0).sum() < k and lo > top * 1e-12:
        hi, lo = lo, lo * 0.1
        beta_lo = solve(lo)
    nnz = int((beta_lo != 0).sum())
    if nnz == k:
        return _sorted(np.flatnonzero(beta_lo))
    if nnz < k:  # degenerate channels never enter
        return _fallback(A, b, beta_lo, k)
    for _ in range(_BISECTION_STEPS):  # hi has < k active, lo has > k
        mid = float(np.sqrt(hi * lo))
        beta = solve(mid)
        nnz = int((beta != 0).sum())
        if nnz == k:
            return _sorted(np.flatnonzero(beta))
        if nnz < k:
            hi = mid
        else:
            lo, beta_lo = mid, beta
    return _fallback(A, b, beta_lo, k)


def _cholesky_psd(A: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``A + εI`` with the smallest ``ε`` (from 1e-12 of the
    mean diagonal up) for which the factorisation succeeds."""
    c = A.shape[0]
    scale = max(float(np.trace(A)) / c, 1e-300)
    for rel in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        try:
            return scipy.linalg.cholesky(A + rel * scale * np.eye(c), lower=True)
        except np.linalg.LinAlgError:
            continue
    w, V = scipy.linalg.eigh(A)  # not PSD beyond round-off: clip the spectrum
    return scipy.linalg.cholesky((V * np.clip(w, 1e-4 * scale, None)) @ V.T, lower=True)


def lasso(A: Tensor, b: Tensor, k: int, *, solver: str = "auto") -> Tensor:
    """Keep the ``k`` channels active at the largest ``λ`` with exactly ``k`` active.

    The LASSO path is followed from ``β = 0`` as ``λ`` decreases; channels enter one at a
    time. The first point with exactly ``k`` non-zero coefficients gives the kept set.
    If the path never has exactly ``k`` (a channel leaving as another enters, or
    degenerate channels that never enter), the ``k`` largest ``|β|`` at the first point
    with at least ``k`` active are kept, and channels that never entered are ranked
    after them by ``b_i / sqrt(A_ii)``.

    ``solver="lars"`` follows the path exactly (:func:`lasso_path`); ``"cd"`` finds a
    ``λ`` with exactly ``k`` active by bisection, solving the LASSO at each ``λ`` by
    coordinate descent (scikit-learn's ``Lasso`` on the Gram), as He et al. did. Both
    return the support of a LASSO solution with ``k`` active channels; they agree
    unless the path has several segments with ``k`` active. ``"auto"`` uses LARS up to
    ``LARS_MAX_CHANNELS`` channels, where it is fast, and coordinate descent above.
    """
    c = A.shape[0]
    _check_k(k, c)
    if solver not in ("auto", "lars", "cd"):
        raise ValueError(f"The 'solver' argument must be 'auto', 'lars' or 'cd'. Got {solver!r}.")
    if k == c:
        return torch.arange(c)
    if solver == "lars" or (solver == "auto" and c <= LARS_MAX_CHANNELS):
        return _lasso_lars(A, b, k)
    return _lasso_cd(A, b, k)


def thinet(A: Tensor, b: Tensor | None, k: int) -> Tensor:
    """ThiNet's greedy selection (Luo et al., 2017) from the channel Gram.

    Grows the set ``T`` of removed channels one at a time, each time adding the channel
    ``j`` that least increases ``‖Σ_{i∈T} Z_i‖² = 1_Tᵀ A 1_T``; the increase is
    ``2 (A 1_T)_j + A_jj``, so each step costs O(c) given ``A``. ``b`` is unused.
    """
    c = A.shape[0]
    _check_k(k, c)
    return _kept(_greedy_removals(A, c - k), c)


def _kept(removals: Tensor, c: int) -> Tensor:
    """The sorted channels of ``0 .. c-1`` not in ``removals``."""
    kept = torch.ones(c, dtype=torch.bool)
    kept[removals] = False
    return torch.nonzero(kept).flatten()


def _nested(removals: Tensor, c: int) -> Tensor:
    """A nested order from ``c - 1`` greedy removals: the survivor, then the removals
    last-removed first."""
    return torch.cat([_kept(removals, c), removals.flip(0)])


def _greedy_removals(A: Tensor, steps: int) -> Tensor:
    """The first ``steps`` channels removed by ThiNet's greedy rule, in removal order."""
    c = A.shape[0]
    A64 = A.detach().double().cpu()
    diag = A64.diagonal().clone()
    running = torch.zeros(c, dtype=torch.float64)  # (A 1_T)
    removed = torch.zeros(c, dtype=torch.bool)
    order = torch.empty(steps, dtype=torch.int64)
    for step in range(steps):
        cost = 2 * running + diag
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))
        removed[j] = True
        order[step] = j
        running += A64[:, j]
    return order


def _obs_removals(
    stats: PatchStats | ChannelStats | None, A: Tensor | None, b: Tensor | None, steps: int
) -> Tensor:
    """The first ``steps`` channels :func:`obs` removes, in removal order."""
    if getattr(stats, "G", None) is not None:  # patch statistics: the least-squares re-fit
        order, _ = removal_order(
            _gram(stats), stats.C, stats.taps, s=stats.s, t=stats.t, count=stats.count, steps=steps
        )
        return order
    if A is None or b is None:
        raise ValueError("The 'stats' (or 'A' and 'b') argument is required for method 'obs'.")
    order, _ = removal_order(A, b[:, None], 1, steps=steps)  # per-channel scales
    return order


def _gram(stats: PatchStats) -> Tensor | Gram:
    """The statistics' ``G``, read by rows where they can (no sum of whole Grams)."""
    return stats.gram() if hasattr(stats, "gram") else stats.G


def _obs_width(stats: PatchStats | ChannelStats | None, A: Tensor | None) -> int:
    if getattr(stats, "G", None) is not None:
        return int(stats.channels)
    if A is None:
        raise ValueError("The 'stats' (or 'A' and 'b') argument is required for method 'obs'.")
    return _check_gram(A)


def obs(
    stats: PatchStats | ChannelStats | None,
    k: int,
    *,
    A: Tensor | None = None,
    b: Tensor | None = None,
) -> Tensor:
    """Greedy removal on the re-fitted least-squares error (:mod:`recon.obs`).

    Removes ``c - k`` channels one at a time, each time the one whose removal raises
    least the error that the consumer's least-squares re-fit (with its bias) leaves,
    ``min_{W,β} Σ‖y − W x_S − β‖²`` over the patch statistics ``stats`` (``G``, ``C``,
    ``s``, ``t``, ``count``, ``taps``). Statistics without a patch Gram (a consumer
    too wide for one: :class:`recon.stats.ChannelStats`) use the channel problem
    ``A, b`` instead, whose re-fit is a scale per channel.
    """
    c = _obs_width(stats, A)
    _check_k(k, c)
    return _kept(_obs_removals(stats, A, b, c - k), c)


def by_score(scores: Tensor, k: int) -> Tensor:
    """Keep the ``k`` channels with the largest scores (ties: lower index first)."""
    c = scores.shape[0]
    _check_k(k, c)
    order = np.argsort(-scores.detach().double().cpu().numpy(), kind="stable")
    return _sorted(order[:k])


def first_k(c: int, k: int) -> Tensor:
    """Keep channels ``0 .. k-1``."""
    _check_k(k, c)
    return torch.arange(k)


def random(c: int, k: int, seed: int) -> Tensor:
    """Keep ``k`` channels drawn uniformly without replacement, seeded."""
    _check_k(k, c)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(c, generator=gen)[:k].sort().values


def select_channels(
    method: str,
    k: int,
    *,
    A: Tensor | None = None,
    b: Tensor | None = None,
    scores: Tensor | None = None,
    width: int | None = None,
    seed: int = 0,
    stats: PatchStats | ChannelStats | None = None,
) -> Tensor:
    """Dispatch to a selection method by name.

    ``lasso`` and ``thinet`` need ``A`` (and ``b``); ``obs`` needs the unit's statistics
    ``stats`` (:class:`recon.stats.PatchStats`, or ``A`` and ``b``); the score methods (``l1``,
    ``max_response``, ``apoz``, ``bn_gamma``: ``SCORE_METHODS``) need ``scores``
    (:func:`recon.scores.channel_scores`); ``first_k`` and ``random`` need only ``width``.
    """
    if method == "lasso":
        return lasso(A, b, k)
    if method == "thinet":
        return thinet(A, b, k)
    if method == "obs":
        return obs(stats, k, A=A, b=b)
    if method in SCORE_METHODS:
        if scores is None:
            raise ValueError(f"The 'scores' argument is required for method {method!r}. Got None.")
        return by_score(scores, k)
    if method == "first_k":
        return first_k(width, k)
    if method == "random":
        return random(width, k, seed)
    raise ValueError(f"The 'method' argument must be one of {METHODS}. Got {method!r} instead.")


# ------------------------------------------------------------------------ nested orders


def thinet_order(A: Tensor) -> Tensor:
    """ThiNet's nested order of the channels: the reverse of its greedy removal order.

    The greedy rule of :func:`thinet` removes one channel at a time, so its kept sets
    are nested: ``sorted(order[:k])`` equals ``thinet(A, None, k)`` for every ``k``.

    Parameters
    ----------
    A : Tensor, shape (c, c)
        The channel Gram.

    Returns
    -------
    Tensor, shape (c,), int64
        A permutation of ``0 .. c-1``: ``order[0]`` is kept first (removed last).
    """
    c = _check_gram(A)
    return _nested(_greedy_removals(A, c - 1), c)


def obs_shared(stats: list[PatchStats], weights: list[float], k: int | None = None) -> Tensor:
    """:func:`obs` for a unit read by several consumers: greedy removal on ``Σ_r w_r E_r``,
    each consumer ``r`` re-fitted on its own patch statistics ``stats[r]``
    (:func:`recon.obs.removal_order_shared`). The ``k`` kept channels, sorted; without
    ``k``, the nested order (as :func:`obs_order`)."""
    c = int(stats[0].channels)
    problems = [
        {"G": _gram(st), "C": st.C, "taps": st.taps, "s": st.s, "t": st.t, "count": st.count}
        for st in stats
    ]
    if k is not None:
        _check_k(k, c)
        return _kept(removal_order_shared(problems, weights, steps=c - k), c)
    return _nested(removal_order_shared(problems, weights), c)


def obs_order(
    stats: PatchStats | ChannelStats | None, *, A: Tensor | None = None, b: Tensor | None = None
) -> Tensor:
    """:func:`obs`'s nested order: the reverse of its removal order.

    ``sorted(order[:k])`` equals ``obs(stats, k)`` for every ``k``.
    """
    c = _obs_width(stats, A)
    return _nested(_obs_removals(stats, A, b, c - 1), c)


def lasso_order(A: Tensor, b: Tensor, *, max_active: int | None = None) -> Tensor:
    """The order in which channels enter the LASSO path (objective of :func:`lasso_path`).

    Channels are ranked by the first point of the path (largest ``λ``) at which their
    coefficient is non-zero. Channels that never enter (dead or duplicate channels,
    or all channels beyond ``max_active``) follow, ranked by ``|b_i| / sqrt(A_ii)`` as
    in :func:`lasso`'s fallback; remaining ties go to the lower index.

    ``sorted(order[:k])`` equals ``lasso(A, b, k, solver="lars")`` for every ``k`` up to
    the first point where a channel leaves the active set (no channel leaves on
    well-conditioned problems with few active channels); beyond it the order is the
    order of first entry, which stays nested where the path does not.

    Parameters
    ----------
    A : Tensor, shape (c, c)
    b : Tensor, shape (c,)
    max_active : int, optional
        Follow the path for this many steps only (one channel enters or leaves per
        step; ``k`` steps cost about ``c·k²``: the whole path takes 0.4 s at
        ``c = 512`` and 2.6 s at ``c = 1024`` on one core); channels not entered by
        then are ranked by the fallback score. Default: the whole path.

    Returns
    -------
    Tensor, shape (c,), int64
        A permutation of ``0 .. c-1``: ``order[0]`` is the first channel to enter.
    """
    c = _check_gram(A)
    _check_b(b, c)
    if max_active is not None:
        if isinstance(max_active, bool) or not isinstance(max_active, int | np.integer):
            raise TypeError(
                f"The 'max_active' argument must be an int >= 1 or None. Got {max_active!r}."
            )
        if max_active < 1:
            raise ValueError(
                f"The 'max_active' argument must be an int >= 1 or None. Got {max_active!r}."
            )
    A64 = A.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LARS warns on collinear/degenerate channels
        _, _, coefs = lars_path_gram(  # (c, n_alphas); one channel enters or leaves a step
            Xy=b64, Gram=A64, n_samples=1, method="lasso", max_iter=max_active or 4 * c
        )
    active = coefs != 0
    entered = np.where(active.any(1), active.argmax(1), np.iinfo(np.int64).max)
    diag = np.clip(A.detach().double().cpu().numpy().diagonal(), 0, None)
    score = np.abs(b.detach().double().cpu().numpy()) / np.sqrt(diag + 1e-300)
    return torch.as_tensor(np.lexsort((-score, entered)), dtype=torch.int64)


def score_order(scores: Tensor) -> Tensor:
    """Channels by decreasing score, ties to the lower index: nested :func:`by_score`."""
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise ValueError(
            "The 'scores' argument must be a 1-D Tensor. "
            f"Got {getattr(scores, 'shape', type(scores).__name__)} instead."
        )
    order = np.argsort(-scores.detach().double().cpu().numpy(), kind="stable")
    return torch.as_tensor(order, dtype=torch.int64)


def channel_order(
    method: str,
    *,
    A: Tensor | None = None,
    b: Tensor | None = None,
    scores: Tensor | None = None,
    width: int | None = None,
    seed: int = 0,
    max_active: int | None = None,
    stats: PatchStats | ChannelStats | None = None,
) -> Tensor:
    """A method's nested order of the channels: which channel it keeps first, second, ...

    The arguments are those of :func:`select_channels` (``max_active`` as in
    :func:`lasso_order`). Keeping the first ``k`` channels of the order is the method's
    selection of ``k`` channels where the method is nested:

    - ``thinet``: :func:`thinet_order`, ``sorted(order[:k]) == thinet(A, b, k)``;
    - ``obs``: :func:`obs_order`, ``sorted(order[:k]) == obs(stats, k)``;
    - ``lasso``: :func:`lasso_order`, equal to ``lasso(A, b, k)`` until a channel
      leaves the path (and up to ``LARS_MAX_CHANNELS`` channels, where ``lasso``
      follows the path);
    - ``l1``, ``max_response``, ``apoz``, ``bn_gamma``: :func:`score_order`;
      ``first_k``: ``0 .. width-1``;
      ``random``: the seeded permutation whose first ``k`` :func:`random` keeps.

    Returns
    -------
    Tensor, shape (c,), int64
        A permutation of the ``c`` channels.
    """
    if method == "obs":
        return obs_order(stats, A=A, b=b)
    if method in ("lasso", "thinet"):
        if A is None:
            raise ValueError(f"The 'A' argument is required for method {method!r}. Got None.")
        if method == "thinet":
            return thinet_order(A)
        if b is None:
            raise ValueError("The 'b' argument is required for method 'lasso'. Got None.")
        return lasso_order(A, b, max_active=max_active)
    if method in SCORE_METHODS:
        if scores is None:
            raise ValueError(f"The 'scores' argument is required for method {method!r}. Got None.")
        return score_order(scores)
    if method in ("first_k", "random"):
        if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 1:
            raise ValueError(
                f"The 'width' argument must be an int >= 1 for method {method!r}. "
                f"Got {width!r} instead."
            )
        if method == "first_k":
            return torch.arange(int(width))
        return torch.randperm(int(width), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"The 'method' argument must be one of {METHODS}. Got {method!r} instead.")


def _check_gram(A: object) -> int:
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(
            "The 'A' argument must be a square (c, c) Tensor with c >= 1. "
            f"Got {getattr(A, 'shape', type(A).__name__)} instead."
        )
    return A.shape[0]


def _check_b(b: object, c: int) -> None:
    if not isinstance(b, Tensor) or tuple(b.shape) != (c,):
        raise ValueError(
            f"The 'b' argument must be a Tensor of shape ({c},). "
            f"Got {getattr(b, 'shape', type(b).__name__)} instead."
        )
