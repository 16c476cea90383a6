"""The naive reference of ``scripts/bench.py``: channel pruning the way the original
code (He et al. 2017) and most PyTorch tools do it. Not part of the library.

For each unit, in forward order, like recon (same units, same channel counts, same
sampled positions from :mod:`recon.sampling` with the same seed, same sequential
error correction, same block-sum target for a residual branch's last conv):

1. run the original network from the input over the calibration set and keep the
   consumer's output ``Y`` at the sampled positions, and run the partly pruned
   network from the input and keep the consumer's input patches ``X`` there
   (two prefix passes per unit; every sample materialised);
2. materialise the per-channel contributions ``Z`` (``N·n × c``):
   ``Z[:, i] = vec(X_i W_iᵀ)``;
3. choose the channels with scikit-learn's ``Lasso`` on ``(Z, vec Y)``, bisecting on
   ``alpha`` until exactly ``k`` coefficients are non-zero (He et al.'s search);
4. re-fit the consumer with scikit-learn's ``LinearRegression`` on the kept patches
   (with intercept), and cut the channels with :func:`recon.surgery.prune_unit`.

Graph discovery and surgery are recon's (they are not what is measured); statistics,
selection and solves are not.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso, LinearRegression
from torch import Tensor, fx, nn

from recon.budget import BudgetUnit, count_flops, resolve_channels
from recon.graph import Graph, Unit, find_units, trace
from recon.layers import SampledConv2d
from recon.sampling import gather_patches, gather_targets, layer_key, sample_positions
from recon.select import lasso_coef
from recon.surgery import prune_unit

BISECTION_STEPS = 60


class _Stop(Exception):
    pass


class _Capture(fx.Interpreter):
    """Runs a traced model until every named node is computed; keeps their values."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.names, self.got = set(names), {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.got[n.name] = out.detach().clone()
            if len(self.got) == len(self.names):
                raise _Stop
        return out


def _capture(gm: fx.GraphModule, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    cap = _Capture(gm, names)
    try:
        cap.run(x)
    except _Stop:
        pass
    return cap.got


def _node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(conv.padding, str):
        return (0, 0, 0, 0) if conv.padding == "valid" else conv._reversed_padding_repeated_twice
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    a = (bn.running_var.double() + bn.eps).rsqrt()
    return a * bn.weight.detach().double() if bn.affine else a


def _samples(
    unit: Unit,
    gm_o: fx.GraphModule,
    gm_p: fx.GraphModule,
    batches: list[Tensor],
    shortcut: str | None,
    scale: Tensor | None,
    samples_per_image: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """All sampled patches X (N, c*k) and targets Y (N, n), as numpy arrays."""
    consumer = gm_p.get_submodule(unit.consumer)
    bias = gm_o.get_submodule(unit.consumer).bias
    out_o = _node(gm_o, unit.consumer).name
    in_p = _node(gm_p, unit.consumer).args[0].name
    xs, ys, offset = [], [], 0
    for xb in batches:
        got_o = _capture(gm_o, xb, [out_o] + ([shortcut] if shortcut else []))
        got_p = _capture(gm_p, xb, [in_p] + ([shortcut] if shortcut else []))
        y = got_o[out_o]
        if bias is not None:
            y = y - bias.detach().view((1, -1) + (1,) * (y.dim() - 2))
        x = got_p[in_p]
        if isinstance(consumer, SampledConv2d):
            x = consumer.sampler(x)
        if unit.consumer_kind == "conv":
            pos = sample_positions(
                y.shape[0],
                y.shape[2] * y.shape[3],
                samples_per_image,
                seed=seed,
                layer=layer_key(unit.name),
                image_offset=offset,
            )
            x = gather_patches(
                x,
                pos,
                kernel_size=consumer.kernel_size,
                stride=consumer.stride,
                padding=_padding(consumer),
                dilation=consumer.dilation,
                out_width=y.shape[3],
            )
            y = gather_targets(y, pos)
            if shortcut is not None:
                sc = gather_targets(got_o[shortcut], pos) - gather_targets(got_p[shortcut], pos)
                y = y * scale.to(y.dtype) + sc
        else:
            x = x.reshape(x.shape[0], -1)
        xs.append(x.numpy())
        ys.append(y.numpy())
        offset += xb.shape[0]
    return np.concatenate(xs), np.concatenate(ys)


def _contributions(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Z (N*n, c), Fortran order: column i is vec(X_i W_iᵀ)."""
    N, (n, c, k) = X.shape[0], W.shape
    Xc = X.reshape(N, c, k)
    Zt = np.empty((c, N * n))  # row i = column i of Z
    for i in range(c):
        Zt[i] = (Xc[:, i, :].astype(np.float64) @ W[:, i, :].T).ravel()
    return Zt.T


def lasso_k(Z: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, float, int]:
    """Channels kept by Lasso with alpha bisected to give ``k`` non-zeros.

    Returns the sorted kept indices, the alpha used, and the number of Lasso fits.
    """
    c = Z.shape[1]
    if k >= c:
        return np.arange(c), 0.0, 0
    m = Z.shape[0]
    hi = float(np.abs(Z.T @ y).max()) / m  # at alpha >= hi every coefficient is zero
    lo = 0.0
    est = Lasso(alpha=hi, fit_intercept=False, warm_start=True, max_iter=1000, tol=1e-4)
    best, alpha, fits = None, hi, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(BISECTION_STEPS):
            alpha = (lo + hi) / 2
            est.set_params(alpha=alpha)
            est.fit(Z, y)
            fits += 1
            nnz = int(np.count_nonzero(est.coef_))
            if nnz == k:
                return np.flatnonzero(est.coef_), alpha, fits
            if nnz < k:
                hi = alpha
            else:
                lo, best = alpha, est.coef_.copy()
    coef = best if best is not None else est.coef_
    keep = np.sort(np.argsort(-np.abs(coef), kind="stable")[:k])
    return keep, alpha, fits


def _counts(model: nn.Module, graph: Graph, example: Tensor, speedup: float) -> dict[str, int]:
    """Channels per unit for ``speedup``: the same budget code as recon.prune."""
    flops, module_flops = count_flops(model, example)
    units = [
        BudgetUnit(u.name, u.width, (u.producer,) if u.producer else (), (u.consumer,))
        for u in graph.units
    ]
    return resolve_channels(
        units,
        speedup=speedup,
        keep_ratio=None,
        channels=None,
        ignored_layers=(),
        round_to=1,
        module_flops=module_flops,
        total_flops=flops,
    )


@torch.no_grad()
def prune_naive(
    model: nn.Module,
    calib: Tensor,
    *,
    speedup: float = 2.0,
    samples_per_image: int | None = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Prune a copy of ``model`` the naive way (CPU); what it kept, and its timings.

    Returns a dict with ``model`` (the pruned copy), ``kept`` (unit -> kept indices),
    ``layers`` (per unit: error before/after re-fit, alpha, Lasso fits, whether recon's
    LARS on ``ZᵀZ, Zᵀy`` keeps the same channels at the same λ), ``phases`` (seconds:
    forward, materialise, lasso, solve, surgery) and ``check`` (seconds spent on the
    comparison with recon's LARS, not part of the naive method).
    """
    import copy

    original = copy.deepcopy(model).eval()
    pruned = copy.deepcopy(model).eval()
    batches = list(calib.split(batch_size))
    graph = find_units(original)
    counts = _counts(original, graph, batches[0][:1], speedup)
    gm_o, gm_p = trace(original), trace(pruned)
    phases = dict.fromkeys(("forward", "materialise", "lasso", "solve", "surgery"), 0.0)
    kept: dict[str, list[int]] = {}
    layers: list[dict[str, Any]] = []
    check = 0.0
    for unit in graph.units:
        k = counts[unit.name]
        if k >= unit.width:
            continue
        block = graph.block_of(unit.consumer)
        shortcut = scale = None
        if block is not None and block.linear_tail:
            shortcut = block.shortcut
            n_out = pruned.get_submodule(unit.consumer).out_channels
            bn = block.bn and pruned.get_submodule(block.bn)
            scale = _bn_scale(bn) if bn else torch.ones(n_out, dtype=torch.float64)
        t = time.perf_counter()
        X, Y = _samples(unit, gm_o, gm_p, batches, shortcut, scale, samples_per_image, seed)
        phases["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        consumer = pruned.get_submodule(unit.consumer)
        n = consumer.weight.shape[0]
        W = consumer.weight.detach().double().reshape(n, unit.width, unit.taps)
        if scale is not None:
            W = W * scale[:, None, None]
        W = W.numpy()
        Z = _contributions(X, W)
        y = Y.astype(np.float64).ravel()
        phases["materialise"] += time.perf_counter() - t
        t = time.perf_counter()
        keep, alpha, fits = lasso_k(Z, y, k)
        phases["lasso"] += time.perf_counter() - t
        # Not part of the naive method (timed apart): recon's selection math at the same
        # λ (= alpha · rows) on the same data, and the error before re-fitting.
        t = time.perf_counter()
        A, b = Z.T @ Z, Z.T @ y
        beta = lasso_coef(torch.from_numpy(A), torch.from_numpy(b), alpha * Z.shape[0])
        same_at_lambda = np.array_equal(np.flatnonzero(beta.numpy()), keep)
        ref = float(y @ y)
        kept_mask = np.zeros(unit.width)
        kept_mask[keep] = 1.0
        err_before = float(((y - Z @ kept_mask) ** 2).sum()) / ref if ref > 0 else 0.0
        del Z, A, b
        check += time.perf_counter() - t
        t = time.perf_counter()
        cols = (keep[:, None] * unit.taps + np.arange(unit.taps)).ravel()
        XS = X[:, cols].astype(np.float64)
        fit = LinearRegression().fit(XS, Y.astype(np.float64))
        resid = Y - XS @ fit.coef_.T - fit.intercept_
        err_after = float((resid**2).sum()) / float((Y.astype(np.float64) ** 2).sum())
        weight = torch.from_numpy(fit.coef_)
        delta = torch.from_numpy(fit.intercept_)
        if scale is not None:  # back from units of the block's sum
            weight, delta = weight / scale[:, None], delta / scale
        phases["solve"] += time.perf_counter() - t
        t = time.perf_counter()
        prune_unit(pruned, unit, torch.as_tensor(keep), weight=weight, bias_delta=delta)
        if unit.kind == "sampler":
            gm_p.set_submodule(unit.consumer, pruned.get_submodule(unit.consumer))
        phases["surgery"] += time.perf_counter() - t
        kept[unit.name] = [int(i) for i in keep]
        layers.append(
            {
                "name": unit.name,
                "channels": [unit.width, k],
                "samples": int(X.shape[0]),
                "z_bytes": int(X.shape[0] * n * unit.width * 8),
                "alpha": alpha,
                "lasso_fits": fits,
                "same_at_lambda": bool(same_at_lambda),
                "error_before": err_before,
                "error_after": err_after,
            }
        )
    return {"model": pruned, "kept": kept, "layers": layers, "phases": phases, "check": check}
